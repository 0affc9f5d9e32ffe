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


def time_batch(e: Any, steps: int, b: int, repeats: int, model: str | None = None) -> float:
    """Median seconds of Engine.run_batch (noise, copy in, sample, copy out, uint8) for `model`
    (None: the default). Called on the engine's compute thread, as in the server."""
    import torch

    card = e.get(model).card
    labels: list[int | None] = [i % card.num_classes if card.num_classes else None for i in range(b)]
    seeds = list(range(b))
    e.run_batch(steps, labels, seeds, model)  # warm
    times = []
    for _ in range(repeats):
        if e.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        e.run_batch(steps, labels, seeds, model)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


Key = tuple[int, int, str | None]  # (steps, batch, model)


def best_of_rounds(e: Any, keys: list[Key], repeats: int, rounds: int) -> dict[Key, float]:
    """(steps, bucket, model) -> seconds: the median of `repeats` timed batches, best over
    `rounds` rounds that each visit every key once (a burst of noise from other processes on a
    shared machine then spoils one round, not the figure)."""
    best = {k: float("inf") for k in keys}
    for _ in range(rounds):
        for key in keys:
            best[key] = min(best[key], e.call(time_batch, e, key[0], key[1], repeats, key[2]))
    return best


def raw_engine(
    checkpoint: str,
    device: str,
    backend: str,
    buckets: list[int],
    steps: list[int],
    models: list[str] | None = None,
) -> Any:
    """An engine of `models` (NAME=PATH entries), else of `checkpoint`, warmed up at `steps`
    (those each model supports)."""
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    s = Settings(checkpoint=checkpoint, models=models or [], device=device, backend=backend, buckets=buckets)
    e = Engine(s, Metrics())
    for m in e.models.values():
        e.call(m.runner.warmup, [st for st in steps if st in m.card.schedules])
    return e


def bench_sampler(
    checkpoint: str,
    device: str,
    backends: list[str],
    buckets: list[int],
    steps_list: list[int],
    repeats: int,
    rounds: int = 1,
    models: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Per (backend, model, steps, bucket): ms per batch and images/s (`best_of_rounds`)."""
    rows = []
    for backend in backends:
        e = raw_engine(checkpoint, device, backend, buckets, steps_list, models)
        keys: list[Key] = [
            (s, b, name)
            for name, m in e.models.items()
            for s in steps_list
            if s in m.card.schedules
            for b in buckets
        ]
        best = best_of_rounds(e, keys, repeats, rounds)
        for (steps, b, name), sec in best.items():
            ms = sec * 1e3
            card = e.get(name).card
            rows.append(
                {
                    "backend": backend,
                    "model": card.name,
                    "family": card.family,
                    "image": f"{card.channels}x{card.image_size}x{card.image_size}",
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
        sec = best_of_rounds(self.e, [(2, batch, None)], self.repeats, self.rounds)[(2, batch, None)]
        row = {"at_s": round(time.monotonic() - self.t0, 1), "when": label, "batch": batch}
        row.update({"ms_per_batch": round(sec * 1e3, 3), "images_per_s": round(batch / sec, 1)})
        self.checks.append(row)
        print(json.dumps(row), flush=True)
        return sec * 1e3

    def close(self) -> None:
        self.e.close()
