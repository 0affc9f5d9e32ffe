"""`cmserve eval --edits`: zero-shot inpainting and super-resolution on the held-out digits.

- Inpainting: the bottom half of each held-out digit is generated (the top half kept) with its
  true class; judged by the LeNet's accuracy on the result and the RMSE of the generated half
  against the true half, beside a class-mean fill (the training split's mean digit of that class).
- Super-resolution from 7×7 (each 4×4 patch's mean): accuracy and full-image RMSE, beside
  bicubic upsampling of the 7×7 input.
Both at every step count of --steps; the noise is seeded, so the table reproduces.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.classifier import load_classifier
from models.data import load_split
from models.editing import Constraint
from models.grid import save_grid
from models.sampler import consistency_sample

SUPERRES_PATCH = 4


def _rmse(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Root mean square error in pixel levels (0-255), over `region` (a 0/1 mask) if given."""
    d2 = ((a - b) * 255.0) ** 2
    if region is None:
        return float(d2.mean().sqrt())
    return float(((d2 * region).sum() / (region.sum() * a.shape[0] / region.shape[0])).sqrt())


def evaluate_edits(args: argparse.Namespace) -> dict[str, Any]:
    model, card = load_checkpoint(args.checkpoint)
    info = card.info()
    clf = load_classifier(args.classifier)
    x, y = load_split("eval")
    n = min(args.num_samples, x.shape[0]) if not args.quick else 50
    x, y = x[:n], y[:n]
    xt, yt = load_split("train")
    class_mean = torch.stack([xt[yt == c].mean(0) for c in range(10)])  # [10, 1, 28, 28]

    gen = torch.zeros(1, 1, 28, 28)
    gen[..., 14:, :] = 1.0  # generate the bottom half
    keep = (1 - gen).expand(n, -1, -1, -1)
    low = F.avg_pool2d(x, SUPERRES_PATCH)  # [n, 1, 7, 7]: the input of super-resolution
    low_up = low.repeat_interleave(SUPERRES_PATCH, -1).repeat_interleave(SUPERRES_PATCH, -2)

    def acc(img: torch.Tensor) -> float:
        with torch.no_grad():
            return float((clf(img.clamp(-0.5, 0.5)).argmax(1) == y).float().mean())

    rows: list[dict[str, Any]] = []
    fill = torch.lerp(class_mean[y], x, keep)
    rows.append({"task": "inpaint bottom half", "method": "class-mean fill", "steps": None,
                 "accuracy": acc(fill), "rmse": _rmse(fill, x, gen)})  # fmt: skip
    bicubic = F.interpolate(low, scale_factor=SUPERRES_PATCH, mode="bicubic", align_corners=False)
    rows.append({"task": "super-resolution 7x7", "method": "bicubic", "steps": None,
                 "accuracy": acc(bicubic), "rmse": _rmse(bicubic.clamp(-0.5, 0.5), x)})  # fmt: skip

    outputs: dict[str, torch.Tensor] = {}
    for steps in (int(s) for s in args.steps.split(",") if s):
        times = torch.tensor(info.schedules[steps])
        noise = torch.randn((steps, n, 1, 28, 28), generator=torch.Generator().manual_seed(args.seed + steps))
        for task, c in (("inpaint bottom half", "inpaint"), ("super-resolution 7x7", "superres")):
            con = Constraint.empty(n, (1, 28, 28))
            if c == "inpaint":
                con.ref[:], con.keep[:] = x, keep
            else:
                con.ref[:] = low_up
                con.patch[:, con.patches.index(SUPERRES_PATCH)] = 1.0
            t0 = time.perf_counter()
            parts = []
            with torch.no_grad():
                for i in range(0, n, args.batch_size):
                    rows_i = slice(i, i + args.batch_size)
                    parts.append(
                        consistency_sample(model, noise[:, rows_i], y[rows_i], times, con.rows(rows_i))
                    )
            out = torch.cat(parts)
            ms = (time.perf_counter() - t0) * 1e3 / n
            out = out.clamp(-0.5, 0.5)
            outputs[f"{c}{steps}"] = out
            rmse = _rmse(out, x, gen) if c == "inpaint" else _rmse(out, x)
            rows.append({"task": task, "method": "consistency", "steps": steps, "accuracy": acc(out),
                         "rmse": rmse, "ms_per_image": round(ms, 2)})  # fmt: skip
    for r in rows:
        r["accuracy"], r["rmse"] = round(r["accuracy"], 4), round(r["rmse"], 2)
        print(r, flush=True)
    if args.grid and "inpaint2" in outputs:
        k = torch.stack([(y == c).nonzero()[0, 0] for c in range(10) if (y == c).any()])  # one per class
        shown = torch.lerp(torch.zeros_like(x[k]), x[k], keep[k])  # the kept half, mid-gray below
        grid = [shown, outputs["inpaint2"][k], low_up[k], outputs["superres2"][k], x[k]]
        save_grid(torch.cat(grid), len(grid), args.grid)
    grid_rows = "masked input, inpainted (2 steps), 7x7 input, super-resolved (2 steps), truth"
    return {"num_samples": n, "seed": args.seed, "checkpoint": str(args.checkpoint), "rows": rows,
            "grid_rows": grid_rows}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = ["| task | method | steps | class accuracy | RMSE (levels) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['method']} | {r['steps'] or '—'} | {r['accuracy'] * 100:.1f} % "
                     f"| {r['rmse']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = evaluate_edits(args)
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        import json

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result
