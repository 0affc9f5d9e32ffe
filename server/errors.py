"""JSON error bodies and the outermost ASGI middleware (request ids, body limit, metrics).

Error bodies follow the OpenAI shape, {"error": {"type", "message", "param", "code"},
"request_id"}, and never echo request content, keys or stack traces.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import REQUEST_ID, access
from server.metrics import Metrics

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KNOWN_ROUTES = {
    "/v1/generate", "/v1/images/generations", "/v1/images/edits", "/v1/images/interpolations",
    "/v1/models", "/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json",
}  # fmt: skip

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def error_response(
    status: int,
    message: str,
    request_id: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, str | None]] | None = None,
) -> JSONResponse:
    """The one error shape. `errors`: every field at fault, where a body has several."""
    error: dict[str, Any] = {
        "type": ERROR_TYPES.get(status, "error"),
        "message": message,
        "param": param,
        "code": code,
    }
    if errors and len(errors) > 1:
        error["errors"] = errors
    body = {"error": error, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


class EdgeMiddleware:
    """Assigns the request id, caps the body size, and counts every response by route and code.

    Pure ASGI (not BaseHTTPMiddleware) so `receive` reaches the route untouched and a client
    disconnect stays visible there. While draining it turns keep-alive off.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        draining: Callable[[], bool] = lambda: False,
        access_log: bool = False,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.draining = draining
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _series(self, route: str, code: int) -> tuple[Any, Any]:
        """The (count, latency) children of (route, code), looked up once: prometheus_client's
        labels() costs a lock and a string join per call, on every request otherwise. Bounded:
        routes are KNOWN_ROUTES or "other", codes the few the server answers."""
        key = (route, code)
        series = self._children.get(key)
        if series is None:
            series = (
                self.metrics.requests.labels(route, str(code)),
                self.metrics.request_latency.labels(route, f"{code // 100}xx"),
            )
            self._children[key] = series
        return series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)  # on every log line while this request is handled
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        status = {"code": 500}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if self.draining():
                    # no keep-alive while draining: a client's next request opens a new connection,
                    # which gets a 503 or is refused, never lost on a connection being closed
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                resp = error_response(
                    413, f"request body larger than {self.max_body} bytes", rid, code="body_too_large"
                )
                await resp(scope, receive, send_wrapped)
                return
            received = {"n": 0}

            async def receive_limited() -> Message:
                msg = await receive()
                if msg["type"] == "http.request":
                    received["n"] += len(msg.get("body", b""))
                    if received["n"] > self.max_body:
                        raise BodyTooLarge()
                return msg

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except BodyTooLarge:
                resp = error_response(
                    413, f"request body larger than {self.max_body} bytes", rid, code="body_too_large"
                )
                await resp(scope, receive, send_wrapped)
        finally:
            elapsed = time.perf_counter() - t0
            count, latency = self._series(route, status["code"])
            count.inc()
            latency.observe(elapsed)
            if self.access_log:
                client = scope.get("client") or ("", 0)
                access.info(
                    '%s %s %d %.1f ms',
                    scope["method"], path, status["code"], elapsed * 1e3,
                    extra={"method": scope["method"], "path": path, "status": status["code"],
                           "duration_ms": round(elapsed * 1e3, 2), "client": client[0]},
                )  # fmt: skip
            REQUEST_ID.reset(token)


class BodyTooLarge(Exception):
    pass


def validation_errors(errors: list[Any]) -> list[dict[str, str | None]]:
    """pydantic errors -> [{"param", "message"}] for every offending field, in one wording:
    "<field>: <what is wrong>" (pydantic's own phrases, without its "Value error, " prefix)."""
    out = []
    seen: set[str | None] = set()
    for e in errors:
        # request bodies are flat: the field is the first part of the location; the rest names
        # the member of a union that failed ("timeout_s.float"), which says nothing to a client
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        if param in seen:  # one entry per field, the first member's reason
            continue
        seen.add(param)
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        out.append({"param": param, "message": f"{param}: {msg}" if param else msg})
    return out or [{"param": None, "message": "invalid request body"}]
