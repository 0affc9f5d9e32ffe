"""Shared request-scope pieces: the server's state, API errors, and API-key dependencies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import generate_latest
from starlette.responses import JSONResponse

from server.batcher import JobQueue
from server.engine import EngineFacts
from server.errors import error_response
from server.fairness import RateLimiter
from server.keys import key_ok
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("cmserve")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    engine: EngineFacts | None = None
    batcher: JobQueue | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    encode_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="cmserve-encode")
    )
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    drain_deadline: float | None = None  # time.monotonic() by which the whole drain must end
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0.0, 0))
    on_drain: list[Callable[[], None]] = field(default_factory=list)  # called once, as draining begins
    # --frontends: in a front-end process, the /metrics body asked of the engine process; in
    # the engine process, its registry with the front ends' added
    scrape: Callable[[], Awaitable[bytes]] | None = None
    merged_metrics: Callable[[], bytes] | None = None
    # a front-end process asks the engine process's limiter, so a key's rate is server-wide
    rate_check: Callable[[str], Awaitable[int]] | None = None

    def begin_drain(self) -> float:
        """Enter draining (idempotent): /readyz and new requests answer 503 from now on. The
        whole drain — queued and running requests, then open connections — shares one budget
        of `shutdown_grace_s` from the first call; -> seconds of it left."""
        if not self.draining:
            self.draining = True
            self.metrics.draining.set(1)
            self.metrics.ready.set(0)
            self.drain_deadline = time.monotonic() + self.settings.shutdown_grace_s
            for fn in self.on_drain:
                fn()
            log.info("draining: %s", self.batcher.snapshot() if self.batcher else {})
        assert self.drain_deadline is not None
        return max(0.0, self.drain_deadline - time.monotonic())

    def metrics_body(self) -> bytes:
        """This process's /metrics text (every process's, in the engine process of --frontends)."""
        if self.merged_metrics is not None:
            return self.merged_metrics()
        return generate_latest(self.metrics.registry)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str | None]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.errors = errors  # every field at fault, for a body with several

    def response(self, request_id: str) -> JSONResponse:
        return error_response(
            self.status, self.message, request_id, param=self.param, code=self.code, headers=self.headers,
            errors=self.errors,
        )  # fmt: skip


async def get_state(request: Request) -> ServerState:
    return request.app.state.cm


State = Annotated[ServerState, Depends(get_state)]


def readiness(st: ServerState) -> tuple[int, str]:
    """(HTTP status, status word) of /readyz: 200 once loaded and warmed up at every bucket and
    step count; 503 before, while draining, and if loading failed."""
    if st.ready and not st.draining:
        return 200, "ready"
    return 503, "draining" if st.draining else ("failed: " + st.load_error if st.load_error else "loading")


def check_key(request: Request, st: ServerState) -> None:
    if not key_ok(request.headers.get("authorization", ""), st.settings.api_keys):
        raise ApiError(
            401, "missing or invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


async def require_key(request: Request, st: State) -> None:
    check_key(request, st)


async def require_key_ops(request: Request, st: State) -> None:
    if st.settings.protect_ops_endpoints:
        check_key(request, st)
