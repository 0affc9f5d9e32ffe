"""`cmserve serve` with a model that answers at once, for `cmserve bench frontend`:

    python -m bench.stub_serve [--fastapi-routes] <serve flags...>

Every batch returns blank images of the model's shape without running it, so a request costs
only what the front end does with it (HTTP, validation, batching, PNG encoding).
`--fastapi-routes` takes the generate routes through FastAPI's routing as every other route,
without server/hot_routes.py: what that short path saves.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.peers import stub_run_batch
from server import app as app_mod
from server import engine as engine_mod
from server.cli import main
from server.hot_routes import without_hot_routes

engine_mod.Engine.run_batch = stub_run_batch  # type: ignore[method-assign]
FASTAPI_ROUTES = "--fastapi-routes"
_create_app = app_mod.create_app


def _create_app_without_hot_routes(*args: Any, **kwargs: Any) -> Any:
    app = _create_app(*args, **kwargs)
    without_hot_routes(app)
    return app


if __name__ == "__main__":
    argv = sys.argv[1:]
    if FASTAPI_ROUTES in argv:
        argv.remove(FASTAPI_ROUTES)
        app_mod.create_app = _create_app_without_hot_routes
    main(["serve", *argv])
