"""The raw sampler, no HTTP: `Engine.run_batch` timed on the engine's compute thread, as the
server runs it — ms per batch and images/s per (backend, bucket, steps)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_batch(e: Any, steps: int, b: int, repeats: int) -> float:
    """Median seconds of Engine.run_batch (noise, copy in, sample, copy out, uint8). Called on the
    engine's compute thread, as in the server."""
    import torch

    labels: list[int | None] = [i % 10 for i in range(b)]
    seeds = list(range(b))
    e.run_batch(steps, labels, seeds)  # warm
    times = []
    for _ in range(repeats):
        if e.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        e.run_batch(steps, labels, seeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_of_rounds(
    e: Any, keys: list[tuple[int, int]], repeats: int, rounds: int
) -> dict[tuple[int, int], float]:
    """(steps, bucket) -> seconds: the median of `repeats` timed batches, best over `rounds` rounds
    that each visit every key once (a burst of noise from other processes on a shared machine then
    spoils one round, not the figure)."""
    best = {k: float("inf") for k in keys}
    for _ in range(rounds):
        for key in keys:
            best[key] = min(best[key], e.call(time_batch, e, key[0], key[1], repeats))
    return best


def raw_engine(checkpoint: str, device: str, backend: str, buckets: list[int], steps: list[int]) -> Any:
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    e = Engine(Settings(checkpoint=checkpoint, device=device, backend=backend, buckets=buckets), Metrics())
    e.call(e.runner.warmup, steps)
    return e


def bench_sampler(
    checkpoint: str,
    device: str,
    backends: list[str],
    buckets: list[int],
    steps_list: list[int],
    repeats: int,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Per (backend, steps, bucket): ms per batch and images/s (`best_of_rounds`)."""
    rows = []
    for backend in backends:
        e = raw_engine(checkpoint, device, backend, buckets, steps_list)
        best = best_of_rounds(e, [(s, b) for s in steps_list for b in buckets], repeats, rounds)
        for (steps, b), sec in best.items():
            ms = sec * 1e3
            rows.append(
                {
                    "backend": backend,
                    "model": e.card.name,
                    "steps": steps,
                    "batch": b,
                    "ms_per_batch": round(ms, 3),
                    "images_per_s": round(b / ms * 1e3, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        e.close()
    return rows


class RawClock:
    """The raw sampler (2 steps), kept loaded for a whole `bench server` run and timed again right
    before and after each cmserve figure it is compared with. Why: this VM's speed drifts by tens
    of % within minutes (raw batch 64 at 182 and 145 images/s 12 minutes apart, one day), so a
    ratio against a figure timed at the start of a 20-minute run measures the drift as well."""

    def __init__(self, checkpoint: str, device: str, repeats: int, rounds: int) -> None:
        self.e = raw_engine(checkpoint, device, "auto", [1, 64], [2])
        self.repeats, self.rounds = repeats, rounds
        self.t0 = time.monotonic()
        self.checks: list[dict[str, Any]] = []

    def ms(self, batch: int, label: str) -> float:
        sec = best_of_rounds(self.e, [(2, batch)], self.repeats, self.rounds)[(2, batch)]
        row = {"at_s": round(time.monotonic() - self.t0, 1), "when": label, "batch": batch}
        row.update({"ms_per_batch": round(sec * 1e3, 3), "images_per_s": round(batch / sec, 1)})
        self.checks.append(row)
        print(json.dumps(row), flush=True)
        return sec * 1e3

    def close(self) -> None:
        self.e.close()
