"""Does quality depend on precision? The shipped model's eval (FLD against the held-out split,
class accuracy by the shipped LeNet) on images the served engine draws at each dtype, with the
same seeds and labels. The fp32 rows drawn twice with other seeds give the eval's own noise.

`make gpu-check` runs it on the GPU (its quality part); on any device:

    python -m bench.gpu_quality --device cpu --dtypes float32,bfloat16,float8 --json out.json
"""

from __future__ import annotations

import argparse
import json
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
        buckets, ckpt = [1, 2, 4, 8, 16, 32, 64], WEIGHTS / "cm-mnist.json"
        try:
            e = build_engine(ckpt, "graph", dtype, buckets, device, shipped_reference=False)
        except Exception as ex:  # a dtype this device cannot serve: recorded, the others still run
            rows.append({"dtype": dtype, "seeds_from": seed0, "error": f"{type(ex).__name__}: {ex}"[:400]})
            continue
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated --dtype values")
    ap.add_argument("--n", type=int, default=1000, help="images per row")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()
    rows = check(args.dtypes.split(","), n=args.n, device=args.device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
