from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from server.app import create_app
from server.settings import Settings


@asynccontextmanager
async def app_client(
    settings: Settings,
    wait_ready: bool = True,
    configure: Callable[[Any], None] | None = None,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan running, behind httpx's ASGI transport. configure(app) runs
    before the first request (its middleware stack is built then); raise_app_exceptions=False
    gets the 500 the app answers instead of the exception it then re-raises."""
    import asyncio

    app = create_app(settings)
    if configure is not None:
        configure(app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if wait_ready:
                for _ in range(6000):  # up to 60 s (warm-up on a busy CI machine)
                    if app.state.cm.ready or app.state.cm.load_error:
                        break
                    await asyncio.sleep(0.01)
                assert app.state.cm.ready, app.state.cm.load_error
            yield client, app
