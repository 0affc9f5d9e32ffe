"""What a user would pick instead, serving the same checkpoint with the same response format,
for `cmserve bench server` (not part of the product):

    python -m bench.peers litserve --port P --checkpoint C --max-batch-size 16 --batch-timeout 0.005
    python -m bench.peers plain --port P --checkpoint C

- litserve: LitServe's own dynamic batching (LitAPI max_batch_size / batch_timeout).
- plain: a FastAPI endpoint that calls the model once per request (a sync route: FastAPI runs it
  in its thread pool).
Both share cmserve's Engine, so the model, noise and PNG encoding are identical, and each runs
every torch call on one thread (torch ops from several threads slow each other down, see
server/engine.py): LitServe on its inference worker's thread, plain on the Engine's thread.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import types
from typing import Any

from models.grid import png_bytes


def engine_settings(checkpoint: str) -> Any:
    """The peers' engine: the model alone, with no accept check (cmserve's runner would score
    every batch of a shipped model, in the batch) and no reference tier."""
    from models.checkpoint import card_paths
    from server.settings import Settings

    card = card_paths(checkpoint)[0]
    scorers = [f"{json.loads(card.read_text())['name']}=none"] if card.is_file() else []
    return Settings(
        checkpoint=checkpoint, buckets=[1, 2, 4, 8, 16, 32, 64], scorers=scorers, shipped_reference=False
    )


def _engine(checkpoint: str, inline: bool = False) -> Any:
    from server.engine import Engine
    from server.metrics import Metrics

    e = Engine(engine_settings(checkpoint), Metrics(), inline=inline)
    e.warmup()
    if os.environ.get(STUB_ENV) == "1":
        e.run_batch = types.MethodType(stub_run_batch, e)  # type: ignore[method-assign]
    return e


STUB_ENV = "CMSERVE_BENCH_STUB"


def stub_run_batch(
    self: Any,
    steps: int,
    labels: list[int | None],
    seeds: list[int],
    model: str | None = None,
    edits: Any = None,
) -> Any:
    """A model that answers at once (blank images of the model's shape): what is left of a
    request's cost is the front end's — HTTP, validation, batching, PNG encoding."""
    import numpy as np

    c, h, w = self.get(model).runner.image_shape
    return np.zeros((len(seeds), h, w, c), dtype=np.uint8)  # what models.grid.to_uint8 returns


def _response(images: Any, seed: int, label: int | None) -> dict[str, Any]:
    return {
        "data": [
            {"b64_json": base64.b64encode(png_bytes(images[0])).decode(), "seed": seed, "class_label": label}
        ]
    }


def run_litserve(args: argparse.Namespace) -> None:
    # LitServe (the bench extra) is imported only when this peer runs; its API class lives at
    # module level in its own module, so LitServe's worker processes can unpickle it
    from bench.peer_litserve import serve

    serve(args.checkpoint, args.port, args.max_batch_size, args.batch_timeout)


def run_plain(args: argparse.Namespace) -> None:
    import uvicorn
    from fastapi import FastAPI

    engine = _engine(args.checkpoint)
    app = FastAPI()

    @app.post("/v1/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:
        label, seed, steps = body.get("class_label"), int(body.get("seed", 0)), int(body.get("steps", 2))
        return _response(engine.call(engine.run_batch, steps, [label], [seed]), seed, label)

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["litserve", "plain"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.005)
    args = ap.parse_args()
    (run_litserve if args.peer == "litserve" else run_plain)(args)


if __name__ == "__main__":
    main()
