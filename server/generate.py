"""POST /v1/generate: validate, queue, wait (deadline, disconnect), encode, answer."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from models.editing import RowEdit
from models.grid import png_bytes
from server.batcher import BatchFailed, DeadlineExceeded, Draining, Job, QueueFull
from server.deps import ApiError, ServerState
from server.engine import Engine, ServedModel, UnknownModel
from server.errors import request_id_of, validation_errors
from server.fairness import tenant_of
from server.schemas import GenerateRequest, GenerateResponse, ImageData, Timings
from server.settings import Settings

M = TypeVar("M", bound=BaseModel)


ANSWERS = ("application/json", "image/png", "*/*", "application/*", "image/*")


def _accepts_png(request: Request) -> bool:
    """Whether to answer with the PNG itself; 406 when the client accepts neither answer."""
    accept = request.headers.get("accept", "")
    if accept and not any(a in accept for a in ANSWERS):
        raise ApiError(
            406, f"Accept: {accept[:60]!r}; this route answers application/json or image/png",
            param="accept", code="not_acceptable",
        )  # fmt: skip
    return "image/png" in accept and "application/json" not in accept


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or 415 / 400."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "content-type must be application/json", code="unsupported_media_type")
    body = await request.body()
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return obj


def json_response(body: dict[str, Any]) -> Response:
    """A compact JSON answer, serialized once (no response model validating it again)."""
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def parse_body(schema: type[M], obj: dict[str, Any], status: int = 422) -> M:
    """`obj` validated by `schema`, or `status` naming the first field at fault and listing all."""
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        errs = validation_errors(list(e.errors()))
        first = errs[0]
        raise ApiError(
            status, str(first["message"]), param=first["param"], code="invalid_value", errors=errs
        ) from None


def served_model(engine: Engine, name: str | None) -> ServedModel:
    """The model a request names (None: the default), or 404 listing what is served."""
    try:
        return engine.get(name)
    except UnknownModel:
        raise ApiError(
            404,
            f"model {name!r} is not served here; it serves {sorted(engine.models)}",
            param="model",
            code="model_not_found",
        ) from None


def _above(param: str, limit: float) -> ApiError:
    """A bound of this server (not of the schema's types), worded and coded as pydantic's own."""
    return ApiError(
        422, f"{param}: Input should be less than or equal to {limit:g}", param=param, code="invalid_value"
    )


def validate(obj: dict[str, Any], st: ServerState, engine: Engine) -> tuple[GenerateRequest, ServedModel]:
    """Schema and model/settings limits (422 naming the field, 404 for an unknown model);
    `steps` resolved from the model's card."""
    req = parse_body(GenerateRequest, obj)
    sm = served_model(engine, req.model)
    card = sm.card
    if req.class_label is None and not card.unconditional_ok:
        raise ApiError(
            422,
            f"model {card.name!r} is class-conditional with no unconditional mode: give class_label "
            f"in [0, {card.num_classes - 1}]",
            param="class_label",
            code="class_required",
        )
    if req.class_label is not None and req.class_label >= card.num_classes:
        raise ApiError(
            422,
            f"class_label must be in [0, {card.num_classes - 1}] or null"
            if card.num_classes
            else f"model {card.name!r} is unconditional: leave class_label out",
            param="class_label",
            code="unknown_class",
        )
    if req.steps is None:
        req.steps = card.steps_default
    if req.steps not in card.schedules:
        raise ApiError(422, f"steps must be one of {card.steps}", param="steps", code="unsupported_steps")
    if req.n > st.settings.max_images_per_request:  # worded and coded as the schema's own bounds
        raise _above("n", st.settings.max_images_per_request)
    if req.timeout_s is not None and req.timeout_s > st.settings.max_timeout_s:
        raise _above("timeout_s", st.settings.max_timeout_s)
    req.model = card.name
    return req, sm


def ready_engine(st: ServerState) -> Engine:
    """The engine, or 503 while loading or draining (checked before the body is read)."""
    if st.draining:
        st.metrics.rejected.labels("draining").inc()
        raise ApiError(503, "server is shutting down", code="draining", headers={"Retry-After": "1"})
    if not st.ready or st.engine is None or st.batcher is None:
        raise ApiError(503, "model is loading", code="not_ready", headers={"Retry-After": "5"})
    return st.engine


def _timeout(request: Request, req: GenerateRequest, s: Settings) -> float:
    t = req.timeout_s
    if t is None and "x-request-timeout" in request.headers:
        # the header's mistakes answer as the body field's do: 422, invalid_value, its name
        try:
            t = float(request.headers["x-request-timeout"])
        except ValueError:
            raise ApiError(
                422, "x-request-timeout: Input should be a number of seconds", param="x-request-timeout",
                code="invalid_value",
            ) from None  # fmt: skip
        if not t > 0:
            raise ApiError(
                422, "x-request-timeout: Input should be greater than 0", param="x-request-timeout",
                code="invalid_value",
            )  # fmt: skip
        if t > s.max_timeout_s:
            raise _above("x-request-timeout", s.max_timeout_s)
    return float(t) if t is not None else s.default_timeout_s


async def _watch_disconnect(request: Request, job: Job) -> None:
    """After the body is read, the next ASGI message is http.disconnect (client gone, or the
    response was sent): flag the job so the batcher drops it if it has not started."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            job.client_gone = True
            return


def _encode(images: Any) -> list[bytes]:
    return [png_bytes(img) for img in images]


# A small PNG encodes faster inline than a hop to a thread pool, where under load it waits for
# the GIL and a core (see cmserve_encode_seconds); bigger payloads go to the pool so the event
# loop never stalls for long.
INLINE_ENCODE_BYTES = 4096
JS_SAFE_SEEDS = 2**53


@dataclass
class Served:
    pngs: list[bytes]
    seed: int  # image i's seed is seed + i
    steps: int
    timings: Timings


async def serve(
    request: Request,
    st: ServerState,
    req: GenerateRequest,
    t_arrive: float,
    edits: list[RowEdit | None] | None = None,
    same_seed: bool = False,
) -> Served | Response:
    """Queue one validated request, wait for it (deadline, disconnect) and encode its images.
    edits: one per image for an edit request (models/editing.py), None for generation;
    same_seed: every image gets `seed` (interpolation frames), not seed + i.
    -> the images, or a bare 499 response when the client left; raises ApiError for the rest."""
    assert st.batcher is not None and req.steps is not None
    batcher, m = st.batcher, st.metrics
    timeout = _timeout(request, req, st.settings)
    # a random seed stays below 2^53 with all of its n images: JavaScript's JSON numbers (and so
    # every browser client) represent integers exactly only up to there
    seed = req.seed if req.seed is not None else secrets.randbelow(JS_SAFE_SEEDS - req.n + 1)
    rid = request_id_of(request.scope)
    tenant = tenant_of(request)
    wait = st.limiter.take(tenant)
    if wait:
        m.rejected.labels("key_rate").inc()
        raise ApiError(
            429, "this key's request rate is over its limit; retry later", code="key_rate_limited",
            headers={"Retry-After": str(wait)},
        )  # fmt: skip
    assert req.model is not None  # set by `validate`
    job = Job(
        model=req.model,
        tenant=tenant,
        steps=req.steps,
        labels=[req.class_label] * req.n,
        seeds=[seed] * req.n if same_seed else [seed + i for i in range(req.n)],
        edits=edits,
        deadline=t_arrive + timeout,
        request_id=rid,
        future=asyncio.get_running_loop().create_future(),
    )
    try:
        batcher.submit(job)
    except QueueFull as e:
        m.rejected.labels(e.reason).inc()
        msg = "queue is full" if e.reason == "queue_full" else "this key holds its share of the queue"
        raise ApiError(
            429, f"{msg}; retry later", code=e.reason, headers={"Retry-After": str(e.retry_after_s)}
        ) from None
    m.inflight.inc()
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        done, _ = await asyncio.wait({job.future}, timeout=max(0.0, job.deadline - time.monotonic()))
        if not done:
            job.future.cancel()
            m.rejected.labels("deadline").inc()
            raise ApiError(504, f"deadline of {timeout:g} s passed", code="deadline_exceeded")
        try:
            result = job.future.result()
        except DeadlineExceeded:
            raise ApiError(
                504, f"deadline of {timeout:g} s passed before compute", code="deadline_exceeded"
            ) from None
        except Draining:
            raise ApiError(503, "server is shutting down", code="draining") from None
        except BatchFailed as e:
            raise ApiError(
                500, f"generation failed ({e.reason}); request id {rid}", code="batch_failed"
            ) from None
        except asyncio.CancelledError:  # dropped because the client left; nobody reads this
            return Response(status_code=499)
        t0 = time.perf_counter()
        if result.images.nbytes <= INLINE_ENCODE_BYTES:
            pngs = _encode(result.images)
        else:
            pngs = await asyncio.get_running_loop().run_in_executor(st.encode_pool, _encode, result.images)
        encode_s = time.perf_counter() - t0
        m.encode.observe(encode_s)
        m.images.labels(req.model).inc(req.n)
    finally:
        watcher.cancel()
        m.inflight.dec()
    total_s = time.monotonic() - t_arrive
    timings = Timings(
        queue=result.queue_s * 1e3, compute=result.compute_s * 1e3, encode=encode_s * 1e3, total=total_s * 1e3
    )
    return Served(pngs, seed, req.steps, timings)


async def generate(request: Request, st: ServerState) -> Any:
    t_arrive = time.monotonic()
    engine = ready_engine(st)
    req, sm = validate(await read_json(request), st, engine)
    png = _accepts_png(request)
    if png and req.n != 1:
        raise ApiError(
            406,
            "Accept: image/png needs n = 1; use JSON for several images",
            param="n",
            code="not_acceptable",
        )
    served = await serve(request, st, req, t_arrive)
    if isinstance(served, Response):
        return served
    name, seed, timings = sm.name, served.seed, served.timings
    if png:
        server_timing = ", ".join(f"{k};dur={v:.2f}" for k, v in timings.model_dump().items())
        headers = {
            "x-seed": str(seed),
            "x-model": name,
            "x-steps": str(served.steps),
            "server-timing": server_timing,
            "x-class-label": "null" if req.class_label is None else str(req.class_label),
        }
        return Response(served.pngs[0], media_type="image/png", headers=headers)
    data = [
        ImageData(b64_json=base64.b64encode(p).decode(), seed=seed + i, class_label=req.class_label)
        for i, p in enumerate(served.pngs)
    ]
    body = GenerateResponse(
        model=name, steps=served.steps, created=int(time.time()), data=data, timings_ms=timings
    )
    # serialized once here: returning the model would make FastAPI validate it a second time
    return Response(body.model_dump_json(), media_type="application/json")
