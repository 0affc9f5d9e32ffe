"""`cmserve serve` with a model that answers at once, for `cmserve bench frontend`:

    python -m bench.stub_serve <serve flags...>

Every batch returns blank images of the model's shape without running it, so a request costs
only what the front end does with it (HTTP, validation, batching, PNG encoding).
"""

from __future__ import annotations

import sys

from bench.peers import stub_run_batch
from server import engine as engine_mod
from server.cli import main

engine_mod.Engine.run_batch = stub_run_batch  # type: ignore[method-assign]

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
