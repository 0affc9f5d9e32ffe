"""`cmserve serve` with a model that answers at once, for `cmserve bench frontend`:

    python -m bench.stub_serve [--fastapi-routes] [--default-gc] [--h11] <serve flags...>

Every batch returns blank images of the model's shape without running it, so a request costs
only what the front end does with it (HTTP, validation, batching, PNG encoding). Each flag takes
one of cmserve's own measures away, to show what it saves:

    --fastapi-routes  the generate routes through FastAPI's routing, as every other route,
                      without server/hot_routes.py
    --default-gc      CPython's default garbage collector settings, without server/heap.py
    --h11             uvicorn's pure-Python HTTP parser (h11), what a host without httptools gets
"""

from __future__ import annotations

import sys
from typing import Any

from bench.peers import stub_run_batch
from server import app as app_mod
from server import engine as engine_mod
from server import heap
from server.cli import main
from server.hot_routes import without_hot_routes

engine_mod.Engine.run_batch = stub_run_batch  # type: ignore[method-assign]
FASTAPI_ROUTES = "--fastapi-routes"
DEFAULT_GC = "--default-gc"
H11 = "--h11"
_create_app = app_mod.create_app
_uvicorn_config = app_mod.uvicorn_config


def _create_app_without_hot_routes(*args: Any, **kwargs: Any) -> Any:
    app = _create_app(*args, **kwargs)
    without_hot_routes(app)
    return app


def _keep_default_gc() -> None:
    pass


def _h11_config(*args: Any, **kwargs: Any) -> Any:
    config = _uvicorn_config(*args, **kwargs)
    config.http = "h11"
    return config


if __name__ == "__main__":
    argv = sys.argv[1:]
    if FASTAPI_ROUTES in argv:
        argv.remove(FASTAPI_ROUTES)
        app_mod.create_app = _create_app_without_hot_routes
    if DEFAULT_GC in argv:
        argv.remove(DEFAULT_GC)
        heap.settle = _keep_default_gc
    if H11 in argv:
        argv.remove(H11)
        app_mod.uvicorn_config = _h11_config
    main(["serve", *argv])
