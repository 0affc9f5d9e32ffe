"""Does quality depend on precision? The shipped model's eval (FLD against the held-out split,
class accuracy by the shipped LeNet) on images the served engine draws at each dtype, with the
same seeds and labels. The fp32 rows drawn twice with other seeds give the eval's own noise."""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.gpu_engine import WEIGHTS, build_engine


def check(
    dtypes: list[str], n: int = 1000, deadline: float = float("inf"), device: str = "cuda"
) -> list[dict[str, Any]]:
    from models.classifier import accuracy, features, frechet_distance, load_classifier
    from models.data import load_split

    clf = load_classifier()
    x_eval, _ = load_split("eval")
    ref = features(clf, x_eval)
    labels: list[int | None] = [i % 10 for i in range(n)]
    y = torch.tensor([i % 10 for i in range(n)])
    rows = []
    runs = [(dt, 0) for dt in dtypes] + [("float32", 10**6)]
    for dtype, seed0 in runs:
        if time.monotonic() > deadline:
            break
        e = build_engine(WEIGHTS / "cm-mnist.json", "graph", dtype, [1, 2, 4, 8, 16, 32, 64], device)
        for steps in (1, 2, 4):
            x = torch.cat([
                e.call(e.sample, steps, labels[i : i + 64], list(range(seed0 + i, seed0 + min(i + 64, n))))
                for i in range(0, n, 64)
            ]).clamp(-0.5, 0.5)  # fmt: skip
            rows.append({
                "dtype": dtype, "seeds_from": seed0, "steps": steps, "n": n,
                "fld": round(frechet_distance(features(clf, x), ref), 3),
                "class_accuracy": round(accuracy(clf, x, y), 4),
            })  # fmt: skip
            print(rows[-1], flush=True)
        e.close()
    return rows
