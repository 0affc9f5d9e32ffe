"""POST /v1/generate: validate, queue, wait (deadline, disconnect), encode, answer."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from models.editing import RowEdit
from models.grid import png_bytes
from models.latent_cm import TableFull
from server import accept, shadow
from server.batcher import BatchFailed, DeadlineExceeded, Draining, Job, JobResult, QueueFull
from server.deps import ApiError, ServerState
from server.engine import EngineFacts, ModelFacts, UnknownModel
from server.errors import request_id_of, validation_errors
from server.fairness import tenant_of
from server.schemas import GenerateRequest, GenerateResponse, ImageData, Timings
from server.settings import Settings

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("cmserve.generate")


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


def client_gone() -> ApiError:
    """A client that hung up before its body arrived: a 499 (nobody reads it) like one that left
    while queued, not a server error — and nothing of it reaches the model."""
    return ApiError(499, "client closed the request", code="client_closed")


async def read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:
        raise client_gone() from None


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or 415 / 400."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "content-type must be application/json", code="unsupported_media_type")
    body = await read_body(request)
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


def served_model(engine: EngineFacts, name: str | None) -> ModelFacts:
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


def validate(obj: dict[str, Any], st: ServerState, engine: EngineFacts) -> tuple[GenerateRequest, ModelFacts]:
    """Schema and model/settings limits (422 naming the field, 404 for an unknown model);
    `steps` resolved from the model's card."""
    req = parse_body(GenerateRequest, obj)
    sm = served_model(engine, req.model)
    card = sm.card
    if card.conditioning_text:
        if req.class_label is not None:
            raise ApiError(
                422, f"model {card.name!r} is prompted: give prompt, not class_label", param="class_label",
                code="prompt_required",
            )  # fmt: skip
        if not (req.prompt or "").strip():
            raise ApiError(
                422, f"model {card.name!r} is prompted: give a non-empty prompt", param="prompt",
                code="prompt_required",
            )  # fmt: skip
    else:
        for field in ("prompt", "guidance_scale"):
            if getattr(req, field) is not None:
                raise ApiError(
                    422, f"{field}: model {card.name!r} is not prompted (it takes class_label)", param=field,
                    code="not_prompted",
                )  # fmt: skip
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
    if req.quality is not None:
        if req.steps is not None:
            raise ApiError(
                422, "give quality or steps, not both", param="quality", code="invalid_value"
            )  # fmt: skip
        names = [t.name for t in sm.tiers]
        if req.quality not in names:
            raise ApiError(
                422, f"model {card.name!r} has no {req.quality!r} tier; its tiers: {names}",
                param="quality", code="unsupported_tier",
            )  # fmt: skip
        req.steps = sm.tiers[names.index(req.quality)].steps
    if req.steps is None:
        req.steps = card.steps_default
    if req.quality is None and req.steps not in card.schedules:
        raise ApiError(422, f"steps must be one of {card.steps}", param="steps", code="unsupported_steps")
    if req.max_attempts is not None and req.max_attempts > st.settings.max_attempts:
        raise _above("max_attempts", st.settings.max_attempts)
    if req.n > st.settings.max_images_per_request:  # worded and coded as the schema's own bounds
        raise _above("n", st.settings.max_images_per_request)
    if req.timeout_s is not None and req.timeout_s > st.settings.max_timeout_s:
        raise _above("timeout_s", st.settings.max_timeout_s)
    req.model = card.name
    return req, sm


def ready_engine(st: ServerState) -> EngineFacts:
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


async def _watch_disconnect(request: Request, st: ServerState, jobs: list[Job]) -> None:
    """After the body is read, the next ASGI message is http.disconnect (client gone, or the
    response was sent): flag the request's jobs (`jobs` grows with its re-rolls) so the batcher
    drops those that have not started."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            assert st.batcher is not None
            for job in jobs:
                st.batcher.abandon(job)
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
    seed: int  # the request's first seed (image i's own is drawn[i].seed)
    steps: int
    timings: Timings
    drawn: list[accept.Drawn]
    tier: str | None = None  # the rung it ran at first
    requested_tier: str | None = None
    degraded: bool = False
    prompt_truncated: bool | None = None


async def serve(
    request: Request,
    st: ServerState,
    req: GenerateRequest,
    t_arrive: float,
    edits: list[RowEdit | None] | None = None,
    same_seed: bool = False,
) -> Served | Response:
    """Queue one validated request, wait for it (deadline, disconnect), re-roll what its accept
    checks reject as its policy says, and encode its images.
    edits: one per image for an edit request (models/editing.py), None for generation;
    same_seed: every image gets `seed` (interpolation frames), not seed + i.
    -> the images, or a bare 499 response when the client left; raises ApiError for the rest."""
    assert st.batcher is not None and st.engine is not None and req.steps is not None
    m = st.metrics
    sm = st.engine.get(req.model)
    timeout = _timeout(request, req, st.settings)
    # a random seed stays below 2^53 with all of its n images: JavaScript's JSON numbers (and so
    # every browser client) represent integers exactly only up to there
    seed = req.seed if req.seed is not None else secrets.randbelow(JS_SAFE_SEEDS - req.n + 1)
    tenant, rid = tenant_of(request), request_id_of(request.scope)
    wait = await st.rate_check(tenant) if st.rate_check is not None else st.limiter.take(tenant)
    if wait:
        m.rejected.labels("key_rate").inc()
        raise ApiError(
            429, "this key's request rate is over its limit; retry later", code="key_rate_limited",
            headers={"Retry-After": str(wait)},
        )  # fmt: skip
    pos, asked, degraded = accept.start_rung(req, sm, st) if edits is None else (-1, None, False)
    rungs = sm.tiers
    model, steps = rungs[pos].sampler if pos >= 0 else (sm.name, req.steps)
    seeds = [seed] * req.n if same_seed else [seed + i for i in range(req.n)]
    drawn = [accept.Drawn(s, pos, model, steps) for s in seeds]
    policy = accept.policy_of(req, st.settings)
    if edits is not None:  # edits are scored, never re-drawn
        policy = accept.Policy("return", 1, policy.threshold)
    text = None  # a prompted model's (row, truncated): its images' label is that row
    if sm.card.conditioning_text:
        text = await _text_row(st, sm, req)
    label = req.class_label if text is None else text[0]
    f = _Flight(st, req, drawn, label, t_arrive + timeout, timeout, tenant, rid, policy.threshold)
    m.inflight.inc()
    watcher = asyncio.create_task(_watch_disconnect(request, st, f.jobs))
    try:
        first = await _draw(f, list(range(req.n)), edits)
        if first is not None:
            return first  # the client left
        for attempt in range(2, policy.max_attempts + 1):
            if policy.on_reject == "return":
                break
            redo = accept.reroll(drawn, rungs, policy, attempt, seeds)
            if not redo:
                break
            m.rerolls.labels(sm.name, policy.on_reject).inc(len(redo))
            try:  # a re-roll that cannot run (queue full, deadline, failure) keeps what was drawn
                gone = await _draw(f, redo, None, reroll=True)
            except ApiError as e:
                log.info("re-roll of %d images stopped: %s", len(redo), e.message)
                break
            if gone is not None:
                return gone
        t0 = time.perf_counter()
        images = np.stack([d.image for d in drawn if d.image is not None])
        if images.nbytes <= INLINE_ENCODE_BYTES:
            pngs = _encode(images)
        else:
            pngs = await asyncio.get_running_loop().run_in_executor(st.encode_pool, _encode, images)
        encode_s = time.perf_counter() - t0
        m.encode.observe(encode_s)
        m.images.labels(sm.name).inc(req.n)
    finally:
        watcher.cancel()
        m.inflight.dec()
        if text is not None:
            st.engine.release_text(sm.name, text[0])
    if edits is None and st.settings.shadow_fraction > 0:
        shadow.maybe_shadow(st, sm, req.class_label, drawn[0], policy.threshold)
    total_s = time.monotonic() - t_arrive
    timings = Timings(
        queue=f.results[0].queue_s * 1e3, compute=sum(r.compute_s for r in f.results) * 1e3,
        encode=encode_s * 1e3, total=total_s * 1e3,
    )  # fmt: skip
    tier = rungs[pos].name if pos >= 0 else None
    return Served(pngs, seed, steps, timings, drawn, tier, asked, degraded, None if text is None else text[1])


DEFAULT_GUIDANCE = 8.5  # diffusers' LatentConsistencyModelPipeline default


async def _text_row(st: ServerState, sm: ModelFacts, req: GenerateRequest) -> tuple[int, bool]:
    """The text-table row of the request's (prompt, w), pinned until `release_text`.
    -> (row, whether the prompt was truncated)"""
    assert st.engine is not None and req.prompt is not None
    w = DEFAULT_GUIDANCE if req.guidance_scale is None else float(req.guidance_scale)
    try:
        row, cut, hit = await st.engine.acquire_text(sm.name, req.prompt, w)
    except TableFull:  # as many distinct prompts queued as the table has rows: back off
        st.metrics.rejected.labels("text_cache_full").inc()
        raise ApiError(
            429, "every text-embedding row holds a prompt still queued; retry later", code="text_cache_full",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    st.metrics.text_cache.labels(sm.name, "hit" if hit else "miss").inc()
    return row, cut


@dataclass
class _Flight:
    """One request's draws: what every job of it shares, and its jobs and their results."""

    st: ServerState
    req: GenerateRequest
    drawn: list[accept.Drawn]
    label: int | None  # the images' label (a prompted model's: its text-table row)
    until: float  # time.monotonic() deadline
    budget: float  # the seconds the deadline gave
    tenant: str
    rid: str
    threshold: float
    jobs: list[Job] = field(default_factory=list)  # the disconnect watcher flags them all
    results: list[JobResult] = field(default_factory=list)


async def _draw(
    f: _Flight, which: list[int], edits: list[RowEdit | None] | None, reroll: bool = False
) -> Response | None:
    """Draw images `which` of a request, one job per sampler they need, and record each
    image, score and cost. -> a bare 499 response when the client left, else None.
    reroll: a re-draw, whose refusal (queue full, deadline) leaves the request answered with
    what it has, so it is not counted as a rejected request."""
    st, req, drawn = f.st, f.req, f.drawn
    assert st.batcher is not None and st.engine is not None
    batcher, m = st.batcher, st.metrics
    rejected = None if reroll else m.rejected
    groups: dict[tuple[str, int], list[int]] = {}
    for i in which:
        groups.setdefault((drawn[i].model, drawn[i].steps), []).append(i)
    mine: list[tuple[Job, list[int]]] = []
    for (model, steps), idx in groups.items():
        job = Job(
            model=model,
            tenant=f.tenant,
            steps=steps,
            labels=[f.label] * len(idx),
            seeds=[drawn[i].seed for i in idx],
            edits=None if edits is None else [edits[i] for i in idx],
            priority=req.priority,
            deadline=f.until,
            request_id=f.rid,
            future=asyncio.get_running_loop().create_future(),
        )
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise _refused(e, mine, rejected) from None
        f.jobs.append(job)
        mine.append((job, idx))
    done, _ = await asyncio.wait({j.future for j, _ in mine}, timeout=max(0.0, f.until - time.monotonic()))
    if len(done) < len(mine):
        for j, _ in mine:
            j.future.cancel()
        if rejected is not None:
            rejected.labels("deadline").inc()
        raise ApiError(504, f"deadline of {f.budget:g} s passed", code="deadline_exceeded")
    for job, idx in mine:
        try:
            result = job.future.result()
        except DeadlineExceeded:
            raise ApiError(
                504, f"deadline of {f.budget:g} s passed before compute", code="deadline_exceeded"
            ) from None
        except Draining:
            raise ApiError(503, "server is shutting down", code="draining") from None
        except BatchFailed as e:
            raise ApiError(
                500, f"generation failed ({e.reason}); request id {f.rid}", code="batch_failed"
            ) from None
        except QueueFull as e:  # a front-end process hears of a full queue only now
            raise _refused(e, mine, rejected) from None
        except asyncio.CancelledError:  # dropped because the client left; nobody reads this
            return Response(status_code=499)
        f.results.append(result)
        accept.record(st, st.engine.get(req.model).tiers, job, idx, drawn, result, f.threshold)
    return None


def _refused(e: QueueFull, mine: list[tuple[Job, list[int]]], rejected: Any) -> ApiError:
    """429 for a request the queue refused (counted in `rejected`, unless None); its other jobs
    leave the queue with it."""
    for j, _ in mine:
        j.future.cancel()
    if rejected is not None:
        rejected.labels(e.reason).inc()
    return ApiError(
        429,
        f"{QUEUE_FULL[e.reason]}; retry later",
        code=e.reason,
        headers={"Retry-After": str(e.retry_after_s)},
    )


QUEUE_FULL = {
    "queue_full": "queue is full",
    "key_queue_share": "this key holds its share of the queue",
    "batch_queue_share": "the queue holds all the batch-priority work it takes",
}


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
    timings, d0 = served.timings, served.drawn[0]
    if png:
        server_timing = ", ".join(f"{k};dur={v:.2f}" for k, v in timings.model_dump().items())
        headers = {
            "x-seed": str(d0.seed),
            "x-model": d0.model,
            "x-steps": str(d0.steps),
            "server-timing": server_timing,
            "x-class-label": "null" if req.class_label is None else str(req.class_label),
            "x-tier": str(_tier(sm, d0)),
            "x-accepted": "null" if d0.accepted is None else str(d0.accepted).lower(),
        }
        return Response(served.pngs[0], media_type="image/png", headers=headers)
    data = [
        ImageData(
            b64_json=base64.b64encode(p).decode(),
            seed=d.seed,
            class_label=req.class_label,
            model=d.model,
            steps=d.steps,
            tier=_tier(sm, d),
            score=d.score,
            accepted=d.accepted,
            attempts=d.attempts,
        )  # fmt: skip
        for p, d in zip(served.pngs, served.drawn, strict=True)
    ]
    body = GenerateResponse(
        model=sm.name, steps=served.steps, tier=served.tier, requested_tier=served.requested_tier,
        degraded=served.degraded, prompt_truncated=served.prompt_truncated, created=int(time.time()),
        data=data, timings_ms=timings,
    )  # fmt: skip
    # serialized once here: returning the model would make FastAPI validate it a second time
    return Response(body.model_dump_json(), media_type="application/json")


def _tier(sm: ModelFacts, d: accept.Drawn) -> str | None:
    return sm.tiers[d.pos].name if d.pos >= 0 else None
