"""The serving (POST) routes taken straight to their handler, past FastAPI's own layers.

Per request FastAPI's stack (exception middleware, exit stack, route matching against every
route, dependency solving, which parses the query string and cookies whatever the endpoint
asks for) was a large share of a generate request's CPU (measured in docs/performance.md,
"Front-end processes and the cost of a request"). A front end's CPU is what caps the served rate on a
GPU, so the POST routes, which carry the load, skip it: this layer sits inside
`EdgeMiddleware` (request id, body limit, metrics and access log still apply; CORS outside it
too) and calls the same handler the FastAPI route is registered with. What the handlers raise
is answered as FastAPI would: `ApiError` by its own response, anything else propagates to the
app's 500 handler. Every other method and path goes on to FastAPI unchanged, and the routes
stay registered there for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.deps import ApiError
from server.errors import request_id_of

Handler = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """`routes`: path -> handler, POST only; handlers return a Response (never a model to
    serialize: there is no response_model step here)."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = scope["type"] == "http" and scope["method"] == "POST"
        handler = self.routes.get(scope["path"]) if post else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except ApiError as e:
            response = e.response(request_id_of(scope))
        await response(scope, receive, send)


def without_hot_routes(app: Any) -> None:
    """Take the short path out of a FastAPI `app` not yet started, so every route goes through
    FastAPI's routing (what the short path is measured and tested against)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not HotRoutes]
