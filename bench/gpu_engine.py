"""The shipped checkpoints through the server's own Engine on the device.

Per dtype: the captured graphs (Triton kernels) against an eager engine running the torch
reference ops, for every bucket and step count, and for the teacher's ODE; per bucket the time
of a whole served batch (`Engine.run_batch`: noise on the host, copies, replay, uint8) against
the replay alone, which shows the host side's share; capture time and memory; batch
invariance (an image sampled alone equals the same image sampled in a full batch).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch

import kernels
from bench.roofline import wall_median

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"


def build_engine(
    ckpt: Path, backend: str, dtype: str, buckets: list[int], device: str = "cuda", **settings: Any
) -> Any:
    """A warmed-up Engine ('graph' = captured on CUDA; off the GPU always eager); `settings`:
    more of its Settings."""
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    if device != "cuda":
        backend = "eager"  # a harness check off the GPU
    s = Settings(
        checkpoint=str(ckpt), device=device, backend=backend, dtype=dtype, buckets=buckets, **settings
    )
    e = Engine(s, Metrics())
    e.warmup()
    return e


def sample_pair(graph: Any, eager: Any, steps: int, n: int, seed0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same n images from `graph` (its kernels as configured) and from `eager` running the
    torch reference ops. Labels cycle through the model's classes, seeds run from seed0."""
    k = graph.card.num_classes
    labels: list[int | None] = [i % k if k else None for i in range(n)]
    seeds = list(range(seed0, seed0 + n))
    a = graph.call(graph.sample, steps, labels, seeds)
    kernels.use_reference(True)
    try:
        b = eager.call(eager.sample, steps, labels, seeds)
    finally:
        kernels.use_reference(False)
    return a, b


def engine_pair(ckpt: Path, dtype: str, buckets: list[int], device: str = "cuda") -> tuple[Any, Any]:
    """(captured engine, eager engine) of one checkpoint, alone (a shipped model's teacher is
    not loaded as its reference)."""
    alone = {"shipped_reference": False}
    return build_engine(ckpt, "graph", dtype, buckets, device, **alone), build_engine(
        ckpt, "eager", dtype, buckets, device, **alone
    )


def _compare(graph: Any, eager: Any, steps: int, n: int, seed0: int) -> dict[str, Any]:
    from models.grid import to_uint8

    a, b = sample_pair(graph, eager, steps, n, seed0)
    ua, ub = to_uint8(a), to_uint8(b)
    return {
        "steps": steps,
        "n": n,
        "max_abs": float((a - b).abs().max()),
        "rel_err": float((a - b).norm() / b.norm()),
        "uint8_pixels_differ": float((ua != ub).mean()),
        "uint8_max_diff": int(abs(ua.astype(int) - ub.astype(int)).max()),
    }


def host_breakdown(g: Any, steps: int, batch: int) -> dict[str, Any]:
    """Where a served batch's time goes, each piece timed alone (ms, device synchronized): the
    per-image seeded noise on the host, pinning it, the runner (copies in, replay with the
    uint8 quantization and finiteness check on the device, copy of the pixels out, which
    synchronizes), and the whole `Engine.run_batch` they make up, the accept check included
    where the scorer runs on the device; then that check alone as an eager pass over the
    batch's images (None without a scorer)."""
    labels: list[int | None] = [i % 10 for i in range(batch)]
    seeds = list(range(batch))
    y = torch.tensor(labels, dtype=torch.long)

    def ms(fn: Any, threads: int = 0) -> float:
        def timed() -> float:  # on the compute thread: intra-op threads are set per thread
            before = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                return wall_median(fn, g.device, 0.2)
            finally:
                torch.set_num_threads(before)

        return round(g.call(timed) * 1e3, 3)

    noise = functools.partial(g.make_noise, steps, seeds)
    served = functools.partial(g.run_batch, steps, labels, seeds)
    return {
        "steps": steps,
        "batch": batch,
        "noise_ms": ms(noise),
        "pin_ms": ms(noise().pin_memory) if g.device.type == "cuda" else None,
        "runner_ms": ms(functools.partial(g.runner.run_images, steps, noise(), y)),
        "served_ms": ms(served),
        # the accept check as a second, eager pass over the batch's images (the shipped models'
        # LeNet, on the device); a device scorer runs inside the served batch instead
        "score_ms": ms(functools.partial(g.get().scorer, served(), labels)) if g.get().scorer else None,
        # the host's small ops with one intra-op thread instead of torch's default (one per core):
        # whether `--torch-threads 1` should be the default beside a GPU
        "torch_threads": g.call(torch.get_num_threads),
        "noise_1_thread_ms": ms(noise, threads=1),
        "served_1_thread_ms": ms(served, threads=1),
    }


def check(dtypes: list[str], deadline: float = float("inf"), device: str = "cuda") -> dict[str, Any]:
    res: dict[str, Any] = {"consistency": [], "teacher": []}
    buckets = [1, 2, 4, 8, 16, 32, 64] if device == "cuda" else [1, 8]
    for dtype in dtypes:
        if time.monotonic() > deadline:
            res["truncated"] = True
            break
        row: dict[str, Any] = {"dtype": dtype}
        try:
            g, e = engine_pair(WEIGHTS / "cm-mnist.json", dtype, buckets, device)
            row["capture_s"] = round(g.runner.capture_s, 3)
            if device == "cuda":
                row["capture_memory_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
            row["vs_reference"] = [
                _compare(g, e, s, n, 1000 * s) for s in g.supported_steps for n in (1, 5, buckets[-1])
            ]
            per_bucket = []
            for steps in g.supported_steps:
                replay = g.call(g.runner.time_buckets, steps)
                for b in buckets:
                    labels: list[int | None] = [i % 10 for i in range(b)]
                    seeds = list(range(b))

                    served = functools.partial(g.run_batch, steps, labels, seeds)
                    sec = g.call(wall_median, served, g.device, 0.2)
                    per_bucket.append({
                        "steps": steps, "batch": b, "served_ms": round(sec * 1e3, 3),
                        "replay_ms": round(replay[b] * 1e3, 3), "images_per_s": round(b / sec, 1),
                    })  # fmt: skip
            row["per_bucket"] = per_bucket
            row["host_breakdown"] = [host_breakdown(g, 2, b) for b in (1, buckets[-1])]
            # batch invariance: image i alone == image i inside a batch of 64
            top = buckets[-1]
            labels_top: list[int | None] = [i % 10 for i in range(top)]
            full = g.call(g.sample, 2, labels_top, list(range(top)))
            pick = [0, top // 2, top - 1]
            alone = torch.cat([g.call(g.sample, 2, [labels_top[i]], [i]) for i in pick])
            row["batch_invariance_max_abs"] = float((full[pick] - alone).abs().max())
            g.close()
            e.close()
        except Exception as ex:
            row["error"] = f"{type(ex).__name__}: {ex}"[:800]
        res["consistency"].append(row)
        print(row, flush=True)
    for dtype in dtypes:
        if time.monotonic() > deadline:
            res["truncated"] = True
            break
        trow: dict[str, Any] = {"dtype": dtype}
        try:
            g, e = engine_pair(WEIGHTS / "teacher-mnist.json", dtype, [1, 16, 64], device)
            trow["capture_s"] = round(g.runner.capture_s, 3)
            trow["vs_reference"] = [_compare(g, e, s, n, 7) for s in g.supported_steps for n in (1, 64)]
            replay = g.call(g.runner.time_buckets, g.supported_steps[-1])
            trow["replay_ms"] = {b: round(v * 1e3, 3) for b, v in replay.items()}
            g.close()
            e.close()
        except Exception as ex:
            trow["error"] = f"{type(ex).__name__}: {ex}"[:800]
        res["teacher"].append(trow)
        print(trow, flush=True)
    return res
