"""The FastAPI app: routes, start-up (load + warm-up in the background) and shutdown (drain)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.grid import png_bytes
from server.batcher import Batcher, BatchFailed, DeadlineExceeded, Draining, Job, QueueFull
from server.engine import Engine
from server.errors import EdgeMiddleware, error_response, first_validation_error, request_id_of
from server.metrics import Metrics
from server.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ImageData,
    ModelCardResponse,
    ModelList,
    Timings,
)
from server.settings import Settings

log = logging.getLogger("cmserve.app")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    encode_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="cmserve-encode")
    )
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _state(request: Request) -> ServerState:
    return request.app.state.cm


State = Annotated[ServerState, Depends(_state)]


def _check_key(request: Request, st: ServerState) -> None:
    keys = st.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    ok = False
    if scheme.lower() == "bearer" and token:
        # compare against every key so the time taken does not tell which (or whether one) matched
        for k in keys:
            ok |= hmac.compare_digest(token.encode(), k.encode())
    if not ok:
        raise ApiError(
            401, "missing or invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


def require_key(request: Request, st: State) -> None:
    _check_key(request, st)


def require_key_ops(request: Request, st: State) -> None:
    if st.settings.protect_ops_endpoints:
        _check_key(request, st)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 406, 413, 415, 422, 429, 500, 503, 504)
}


def create_app(settings: Settings, engine: Engine | None = None, metrics: Metrics | None = None) -> FastAPI:
    """engine: a loaded Engine (the CLI loads it first to fail fast) sharing `metrics`;
    None = load it in the background after start-up."""
    metrics = metrics or (engine.metrics if engine is not None else Metrics())
    st = ServerState(settings, metrics, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(st))
        st.tasks.add(task)
        yield
        st.draining = True
        metrics.draining.set(1)
        metrics.ready.set(0)
        if st.batcher is not None:
            await st.batcher.drain(settings.shutdown_grace_s)
            await st.batcher.stop()
        task.cancel()
        st.encode_pool.shutdown(wait=False)

    app = FastAPI(
        title="cmserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Few-step consistency model inference server.",
    )
    app.state.cm = st
    app.add_middleware(
        EdgeMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, draining=lambda: st.draining
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id", "x-request-timeout"],
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(
            e.status, e.message, request_id_of(request.scope), param=e.param, code=e.code, headers=e.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        msg, param = first_validation_error(list(e.errors()))
        return error_response(422, msg, request_id_of(request.scope), param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(
            e.status_code,
            str(e.detail),
            request_id_of(request.scope),
            headers=dict(e.headers) if e.headers else None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in request %s", request_id_of(request.scope))
        return error_response(
            500, "internal server error", request_id_of(request.scope), code="internal_error"
        )

    @app.get("/healthz", response_model=HealthResponse, dependencies=[Depends(require_key_ops)])
    async def healthz() -> dict[str, str]:
        """Alive: the process answers. Never touches the model or the queue."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse}},
        dependencies=[Depends(require_key_ops)],
    )
    async def readyz(st: State) -> Any:
        """200 once the model is loaded and warmed up at every bucket and step count; 503 before,
        while draining, and if loading failed."""
        if st.ready and not st.draining:
            return {"status": "ready"}
        status = "draining" if st.draining else ("failed: " + st.load_error if st.load_error else "loading")
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", dependencies=[Depends(require_key_ops)], response_class=Response)
    async def metrics_route(st: State) -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(require_key)])
    async def models(st: State) -> Any:
        if st.engine is None:
            raise ApiError(503, "model is loading", code="not_ready")
        return ModelList(data=[model_card(st.engine)])

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        dependencies=[Depends(require_key)],
        responses={
            **ERRORS,
            200: {
                "content": {"image/png": {}},
                "description": "JSON, or PNG bytes when `Accept: image/png` and n = 1",
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
            }
        },
    )
    async def generate(request: Request, st: State) -> Any:
        return await _generate(request, st)

    # make GenerateRequest appear in components/schemas for the openapi_extra reference
    _orig_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = _orig_openapi()
            req = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            _limit_schema(req, st)
            schema.setdefault("components", {}).setdefault("schemas", {})["GenerateRequest"] = req
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node: Any) -> None:
    """pydantic leaves constraints that follow a before-validator as raw ge/le/gt/lt keys;
    rename them to the JSON Schema keywords clients understand."""
    if isinstance(node, dict):
        for k in [k for k in node if k in _BOUNDS]:
            node[_BOUNDS[k]] = node.pop(k)
        for v in node.values():
            _json_schema_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _json_schema_bounds(v)


def _limit_schema(req: dict[str, Any], st: ServerState) -> None:
    """Write the limits of this server and its model into the request schema, so clients (and
    schemathesis) see exactly what is accepted: n up to max_images_per_request, the model's
    classes and step counts."""
    _json_schema_bounds(req)
    props = req["properties"]
    props["n"]["maximum"] = st.settings.max_images_per_request
    if st.engine is not None:
        card = st.engine.card
        for alt in props["class_label"].get("anyOf", []):
            if alt.get("type") == "integer":
                alt["maximum"] = card.arch.num_classes - 1
        props["steps"].pop("maximum", None)
        props["steps"].pop("minimum", None)
        props["steps"]["enum"] = card.steps


def model_card(engine: Engine) -> ModelCardResponse:
    c = engine.card
    return ModelCardResponse(
        id=c.name,
        kind=c.kind,
        placeholder=engine.placeholder,
        image_size=c.arch.image_size,
        channels=c.arch.channels,
        classes=list(c.class_names),
        supported_steps=c.steps,
        default_steps=2 if 2 in c.schedules else c.steps[0],
        schedules={str(k): list(v) for k, v in c.schedules.items()},
        provenance=c.provenance,
    )


async def _start(st: ServerState) -> None:
    """Load (if needed) and warm up off the event loop, then open the gates."""
    try:
        if st.engine is None:
            st.engine = await asyncio.to_thread(Engine, st.settings, st.metrics)
        engine = st.engine
        seconds = await asyncio.to_thread(engine.warmup)
        log.info("warm-up of %d (bucket, steps) slots took %.1f s", len(engine.runner.slots), seconds)
        s = st.settings
        st.batcher = Batcher(
            engine.run_batch,
            st.metrics,
            max_batch_size=s.max_batch_size,
            max_queue_images=s.max_queue_images,
            max_wait_s=s.max_wait_ms / 1000.0,
        )
        st.batcher.start()
        st.ready = True
        st.metrics.ready.set(1)
    except Exception as e:
        st.load_error = f"{type(e).__name__}: {e}"
        log.exception("start-up failed")


def _accepts_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


async def _parse(request: Request, st: ServerState, engine: Engine) -> GenerateRequest:
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
    try:
        req = GenerateRequest.model_validate(obj)
    except ValidationError as e:
        msg, param = first_validation_error(list(e.errors()))
        raise ApiError(422, msg, param=param, code="invalid_value") from None
    card = engine.card
    if req.class_label is not None and req.class_label >= card.arch.num_classes:
        raise ApiError(
            422,
            f"class_label must be in [0, {card.arch.num_classes - 1}] or null",
            param="class_label",
            code="unknown_class",
        )
    if req.steps not in card.schedules:
        raise ApiError(422, f"steps must be one of {card.steps}", param="steps", code="unsupported_steps")
    if req.n > st.settings.max_images_per_request:
        raise ApiError(
            422, f"n must be at most {st.settings.max_images_per_request}", param="n", code="n_too_large"
        )
    return req


def _timeout(request: Request, req: GenerateRequest, s: Settings) -> float:
    t = req.timeout_s
    if t is None and "x-request-timeout" in request.headers:
        try:
            t = float(request.headers["x-request-timeout"])
        except ValueError:
            raise ApiError(
                400, "x-request-timeout must be a number of seconds", code="invalid_value"
            ) from None
        if not t > 0:
            raise ApiError(400, "x-request-timeout must be positive", code="invalid_value")
    return min(float(t) if t is not None else s.default_timeout_s, s.max_timeout_s)


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


async def _generate(request: Request, st: ServerState) -> Any:
    t_arrive = time.monotonic()
    if st.draining:
        st.metrics.rejected.labels("draining").inc()
        raise ApiError(503, "server is shutting down", code="draining", headers={"Retry-After": "1"})
    if not st.ready or st.engine is None or st.batcher is None:
        raise ApiError(503, "model is loading", code="not_ready", headers={"Retry-After": "5"})
    engine, batcher, m = st.engine, st.batcher, st.metrics
    req = await _parse(request, st, engine)
    png = _accepts_png(request)
    if png and req.n != 1:
        raise ApiError(
            406,
            "Accept: image/png needs n = 1; use JSON for several images",
            param="n",
            code="not_acceptable",
        )
    timeout = _timeout(request, req, st.settings)
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    rid = request_id_of(request.scope)
    job = Job(
        steps=req.steps,
        labels=[req.class_label] * req.n,
        seeds=[seed + i for i in range(req.n)],
        deadline=t_arrive + timeout,
        request_id=rid,
        future=asyncio.get_running_loop().create_future(),
    )
    try:
        batcher.submit(job)
    except QueueFull as e:
        m.rejected.labels("queue_full").inc()
        raise ApiError(
            429,
            "queue is full; retry later",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after_s)},
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
        pngs = await asyncio.get_running_loop().run_in_executor(st.encode_pool, _encode, result.images)
        encode_s = time.perf_counter() - t0
        m.encode.observe(encode_s)
        m.images.inc(req.n)
    finally:
        watcher.cancel()
        m.inflight.dec()
    total_s = time.monotonic() - t_arrive
    timings = Timings(
        queue=result.queue_s * 1e3, compute=result.compute_s * 1e3, encode=encode_s * 1e3, total=total_s * 1e3
    )
    name = engine.card.name
    if png:
        server_timing = ", ".join(f"{k};dur={v:.2f}" for k, v in timings.model_dump().items())
        headers = {
            "x-seed": str(seed),
            "x-model": name,
            "x-steps": str(req.steps),
            "server-timing": server_timing,
            "x-class-label": "null" if req.class_label is None else str(req.class_label),
        }
        return Response(pngs[0], media_type="image/png", headers=headers)
    data = [
        ImageData(b64_json=base64.b64encode(p).decode(), seed=seed + i, class_label=req.class_label)
        for i, p in enumerate(pngs)
    ]
    return GenerateResponse(
        model=name, steps=req.steps, created=int(time.time()), data=data, timings_ms=timings
    )
