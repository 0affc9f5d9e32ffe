from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from server.app import create_app
from server.settings import Settings


@asynccontextmanager
async def app_client(
    settings: Settings, wait_ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan running, behind httpx's ASGI transport."""
    import asyncio

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if wait_ready:
                for _ in range(6000):  # up to 60 s (warm-up on a busy CI machine)
                    if app.state.cm.ready or app.state.cm.load_error:
                        break
                    await asyncio.sleep(0.01)
                assert app.state.cm.ready, app.state.cm.load_error
            yield client, app
