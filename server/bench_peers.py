"""What a user would pick instead, serving the same checkpoint with the same response format,
for `cmserve bench server` (not part of the product):

    python -m server.bench_peers litserve --port P --checkpoint C --max-batch-size 16 --batch-timeout 0.005
    python -m server.bench_peers plain --port P --checkpoint C

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
from typing import Any

import litserve as ls

from models.grid import png_bytes


def _engine(checkpoint: str, inline: bool = False) -> Any:
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    e = Engine(Settings(checkpoint=checkpoint, buckets=[1, 2, 4, 8, 16, 32, 64]), Metrics(), inline=inline)
    e.warmup()
    return e


def _response(images: Any, seed: int, label: int | None) -> dict[str, Any]:
    return {
        "data": [
            {"b64_json": base64.b64encode(png_bytes(images[0])).decode(), "seed": seed, "class_label": label}
        ]
    }


class CMApi(ls.LitAPI):
    """LitServe serving the cmserve Engine; LitServe does the batching."""

    def __init__(self, checkpoint: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        self.engine = _engine(self.checkpoint, inline=True)

    def decode_request(self, request):  # LitServe reads a typed annotation as a request schema
        return request.get("class_label"), int(request.get("seed", 0)), int(request.get("steps", 2))

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: list[tuple[int | None, int, int]]) -> list[Any]:
        images = self.engine.run_batch(x[0][2], [i[0] for i in x], [i[1] for i in x])
        return [(images[i : i + 1], x[i][1], x[i][0]) for i in range(len(x))]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        return _response(*output)


def run_litserve(args: argparse.Namespace) -> None:
    api = CMApi(
        args.checkpoint,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path="/v1/generate",
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False)


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
