"""LitServe serving cmserve's Engine, for `bench.peers litserve` (imports litserve: the bench extra)."""

from __future__ import annotations

from typing import Any

import litserve as ls

from bench.peers import _engine, _response


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


def serve(checkpoint: str, port: int, max_batch_size: int, batch_timeout: float) -> None:
    api = CMApi(
        checkpoint, max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/generate"
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(port=port, host="127.0.0.1", generate_client_file=False)
