"""The FastAPI app: routes, start-up (load + warm-up in the background) and shutdown (drain)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import edits, openai_images
from server import openapi as openapi_doc
from server.batcher import Batcher
from server.deps import ApiError, ServerState, State, check_key, readiness, require_key, require_key_ops
from server.engine import Engine, ModelFacts
from server.errors import EdgeMiddleware, error_response, request_id_of, validation_errors
from server.fairness import RateLimiter
from server.frontends import FrontendPool
from server.generate import generate as handle_generate
from server.hot_routes import Handler, HotRoutes
from server.metrics import Metrics
from server.ops_listener import OpsServer
from server.schemas import (
    GenerateResponse,
    HealthResponse,
    ModelCardResponse,
    ModelList,
)
from server.settings import Settings
from server.step_batcher import StepBatcher

log = logging.getLogger("cmserve.app")
PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    metrics: Metrics | None = None,
    starter: Callable[[ServerState], Awaitable[None]] | None = None,
) -> FastAPI:
    """engine: a loaded Engine (the CLI loads it first to fail fast) sharing `metrics`;
    None = load it in the background after start-up.
    starter: what start-up awaits instead of loading an engine in the background (a front-end
    process connects to the engine process, server/remote.py).
    With settings.frontends > 1 this app is the engine process's: it spawns the front-end
    processes that serve the API port (server/frontends.py) and serves no HTTP itself."""
    metrics = metrics or (engine.metrics if engine is not None else Metrics())
    st = ServerState(
        settings, metrics, engine, limiter=RateLimiter(settings.key_rate_limit, settings.key_rate_burst)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if starter is not None:  # before the port listens: a front end not linked takes no request
            await starter(st)
        else:
            st.tasks.add(asyncio.create_task(_start(st)))
        pool = await FrontendPool(st, settings.frontends).start() if settings.frontends > 1 else None
        ops = OpsServer(st, settings.host, settings.ops_port).start() if settings.ops_port else None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(
            NotImplementedError, RuntimeError, ValueError
        ):  # no signals off the main thread
            loop.add_signal_handler(signal.SIGHUP, _reload_keys, settings, pool)
        yield
        left = st.begin_drain()  # a no-op past DrainingServer's signal: its budget runs on
        if pool is not None:  # they answer what they hold (from the batcher, still running)
            await pool.wait_frontends(left)
            left = st.begin_drain()
        if st.batcher is not None:
            await st.batcher.drain(left)
            await st.batcher.stop()  # answers whatever the grace period did not cover
        for task in list(st.tasks):
            task.cancel()
        st.encode_pool.shutdown(wait=False)
        if ops is not None:
            ops.stop()
        if pool is not None:
            await pool.close()
        if st.engine is not None:
            st.engine.close(wait=False)  # a batch still running finishes

    app = FastAPIOffline(  # /docs and /redoc with their assets served here, not from a CDN
        docs_url="/docs",
        redoc_url="/redoc",
        static_url="/docs/assets",
        swagger_ui_parameters={"persistAuthorization": True},
        redirect_slashes=False,  # "/v1/generate/" is not a route: 404, not a redirect
        title="cmserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Few-step consistency model inference server.",
    )
    app.state.cm = st

    # The serving (POST) routes: their keys are checked inline (not through Depends) and
    # HotRoutes calls them past FastAPI's routing; they stay registered with FastAPI (below) for
    # the OpenAPI document, under the handler's name and docstring.
    def serving(handler: Callable[[Request, ServerState], Awaitable[Any]]) -> Handler:
        async def route(request: Request) -> Any:
            check_key(request, st)
            return await handler(request, st)

        route.__name__, route.__doc__ = handler.__name__, handler.__doc__
        return route

    generate = serving(handle_generate)
    images_generations = serving(openai_images.images_generations)
    images_edits = serving(edits.images_edits)
    images_interpolations = serving(edits.images_interpolations)
    # added first, so the innermost of the app's middleware: EdgeMiddleware and CORS wrap it
    hot = {
        "/v1/generate": generate,
        "/v1/images/generations": images_generations,
        "/v1/images/edits": images_edits,
        "/v1/images/interpolations": images_interpolations,
    }
    app.add_middleware(HotRoutes, routes=hot)
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        draining=lambda: st.draining,
        access_log=settings.access_log,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id", "x-request-timeout"],
            # what a browser client may read of an answer: its seed and ids, timings, backoff
            expose_headers=[
                "x-request-id",
                "x-seed",
                "x-model",
                "x-steps",
                "x-class-label",
                "server-timing",
                "retry-after",
            ],  # fmt: skip
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response(request_id_of(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = validation_errors(list(e.errors()))
        msg, param = str(errs[0]["message"]), errs[0]["param"]
        rid = request_id_of(request.scope)
        return error_response(422, msg, rid, param=param, code="invalid_value", errors=errs)

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

    if settings.playground:

        @app.get("/", include_in_schema=False, response_class=HTMLResponse)
        async def playground() -> HTMLResponse:
            """A page to try the model: no build step, no CDN, works offline (the key, if the
            server has keys, is typed into the page and sent only to this server)."""
            return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

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
        code, status = readiness(st)
        return {"status": status} if code == 200 else JSONResponse({"status": status}, status_code=code)

    @app.get("/metrics", dependencies=[Depends(require_key_ops)], response_class=Response)
    async def metrics_route(st: State) -> Response:
        body = await st.scrape() if st.scrape is not None else st.metrics_body()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_key)])
    async def models(st: State) -> Any:
        if st.engine is None:
            raise ApiError(503, "model is loading", code="not_ready")
        e = st.engine
        return ModelList(data=[model_card(m, m.name == e.default) for m in e.models.values()])

    app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={200: {"description": "JSON, or the PNG itself when `Accept: image/png` and n = 1"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
            }
        },
    )(generate)
    app.post(
        "/v1/images/generations",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImagesRequest"}}},
            }
        },
    )(images_generations)

    app.post(
        "/v1/images/edits",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/EditRequest"}},
                    "application/json": {"schema": {"$ref": "#/components/schemas/EditRequest"}},
                },
            }
        },
    )(images_edits)
    app.post(
        "/v1/images/interpolations",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InterpolationRequest"}}
                },
            }
        },
    )(images_interpolations)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_doc.build(base_openapi(), st)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def model_card(m: ModelFacts, default: bool) -> ModelCardResponse:
    c = m.card
    return ModelCardResponse(
        id=c.name,
        family=c.family,
        kind=c.kind,
        default=default,
        placeholder=m.placeholder,
        image_size=c.image_size,
        channels=c.channels,
        classes=list(c.class_names),
        unconditional=c.unconditional_ok,
        conditioning=c.conditioning,
        time=c.time_name,
        supported_steps=c.steps,
        default_steps=c.steps_default,
        tiers={t.name: {"model": t.model, "steps": t.steps} for t in m.tiers},
        accept_check=m.accept_check,
        schedules={str(k): list(v) for k, v in c.schedules.items()},
        provenance=c.provenance,
    )


def _reload_keys(settings: Settings, pool: FrontendPool | None = None) -> None:
    """SIGHUP: the API keys file is read again (rotate keys without a restart), by the front-end
    processes too."""
    if pool is not None:
        pool.signal(signal.SIGHUP)
    try:
        n = settings.reload_keys()
    except OSError as e:
        log.error("SIGHUP: cannot read the API keys file, keys unchanged: %s", e)
    else:
        log.info("SIGHUP: API keys reloaded (%d keys)", n)


async def _start(st: ServerState) -> None:
    """Load (if needed) and warm up off the event loop, then open the gates."""
    try:
        engine = st.engine if isinstance(st.engine, Engine) else None
        if engine is None:
            engine = await asyncio.to_thread(Engine, st.settings, st.metrics)
            st.engine = engine
        seconds = await asyncio.to_thread(engine.warmup)
        log.info("warm-up of %d model(s) took %.1f s", len(engine.models), seconds)
        s = st.settings
        limits = {
            name: s.max_batch_size or await asyncio.to_thread(engine.auto_max_batch, name)
            for name in engine.models
        }
        max_batch = limits[engine.default]
        st.metrics.max_batch.set(max_batch)
        batcher: Batcher
        if s.batching == "step":
            # a model's rows in flight never exceed its step runner's buffers (the largest bucket)
            limits = {n: min(b, engine.models[n].stepper.capacity) for n, b in limits.items()}  # type: ignore[union-attr]
            batcher = StepBatcher(
                engine.step_rows,
                engine.step,
                engine.clear_steps,
                st.metrics,
                max_batch_size=max_batch,
                model_max_batch=limits,
                max_queue_images=s.max_queue_images,
                executor=engine.executor,
                tenant_share=s.key_queue_share,
                batch_share=s.batch_queue_share,
                score_fn=engine.score,
                background_share=s.shadow_max_share,
            )
        else:
            batcher = Batcher(
                engine.run_batch,
                st.metrics,
                max_batch_size=max_batch,
                model_max_batch=limits,
                max_queue_images=s.max_queue_images,
                max_wait_s=s.max_wait_ms / 1000.0,
                executor=engine.executor,
                tenant_share=s.key_queue_share,
                batch_share=s.batch_queue_share,
                score_fn=engine.score,
                background_share=s.shadow_max_share,
            )
        st.batcher = batcher
        batcher.start()
        st.ready = True
        st.metrics.ready.set(1)
        log.info(
            "ready: /readyz answers 200; serving %s (default %s), %s batching, max batch %s",
            ", ".join(engine.models), engine.default, s.batching, limits,
        )  # fmt: skip
    except Exception as e:
        st.load_error = f"{type(e).__name__}: {e}"
        log.exception("start-up failed")


def uvicorn_config(app: FastAPI, s: Settings) -> uvicorn.Config:
    """How every cmserve process runs its app under uvicorn."""
    return uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        log_config=None,  # uvicorn's loggers go through cmserve's handler (text or JSON)
        access_log=False,  # cmserve's own access log carries the request id (--access-log)
        timeout_graceful_shutdown=max(1, int(s.shutdown_grace_s)),
    )


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: /readyz and new requests get 503 at once, queued and running
    requests finish, then uvicorn's own shutdown waits for open connections and closes the
    sockets — all within one `shutdown_grace_s` (`ServerState.begin_drain`). A second signal
    exits without waiting."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.cm = state
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.cm.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self.cm.begin_drain()
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain, loop)

    def _start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self._drain_task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        # the last second of the budget is kept for answering and closing connections: whatever
        # has not run by then gets its 503 now, before uvicorn's own wait (which would cancel a
        # request still waiting: an answer lost)
        batcher = self.cm.batcher
        if batcher is not None and not await batcher.drain(max(0.0, self.cm.begin_drain() - 1.0)):
            await batcher.stop()
        await asyncio.sleep(0.05)  # let the last responses reach their sockets
        # uvicorn then waits for open connections, within what is left of the same budget
        self.config.timeout_graceful_shutdown = max(1, int(self.cm.begin_drain()))
        self.should_exit = True
