"""`cmserve eval`: FLD, class accuracy and speed of the consistency model vs its teacher.

Every generated row draws the same number of class-balanced samples; the reference is the
500-image held-out split. The "real" row is the floor: training images against the same held-out
set (drawn with replacement when more are asked than the 4,500 the split holds), with the
classifier's accuracy on the held-out images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_checkpoint
from models.classifier import DEFAULT_CLASSIFIER, accuracy, features, frechet_distance, load_classifier
from models.consistency import TrigFlow, teacher_times
from models.sampler import consistency_sample, ode_sample

WEIGHTS = Path(__file__).resolve().parent / "weights"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=str(WEIGHTS / "cm-mnist.json"), help="consistency checkpoint")
    p.add_argument(
        "--teacher", default=str(WEIGHTS / "teacher-mnist.json"), help="diffusion teacher checkpoint"
    )
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="LeNet weights (FLD features)")
    p.add_argument(
        "--train-classifier", action="store_true", help="(re)train the classifier first and save it"
    )
    p.add_argument("--num-samples", type=int, default=5000, help="samples per row (class-balanced)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampler call")
    p.add_argument("--steps", default="1,2,4", help="consistency step counts")
    p.add_argument("--teacher-steps", type=int, default=32, help="ODE steps of the teacher rows")
    p.add_argument(
        "--teacher-guidance",
        default="1",
        help="classifier-free guidance scales of the teacher rows, comma list",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (the tables reproduce)")
    p.add_argument("--quick", action="store_true", help="100 samples, 4 teacher steps: a smoke run")
    p.add_argument("--json", default="", help="write {'rows': [...]} here")
    p.add_argument("--grid", default="", help="also save a 10-class x 8-seed 2-step grid PNG here")
    p.add_argument(
        "--edits",
        action="store_true",
        help="evaluate zero-shot inpainting and super-resolution instead (models/eval_edits.py)",
    )
    p.add_argument(
        "--tune-schedules",
        action="store_true",
        help="search the re-noising times of 2-4 steps by FLD and write a card with the best",
    )
    p.add_argument(
        "--tuned-card",
        default="",
        help="where --tune-schedules writes its card (default: <checkpoint>-tuned.json)",
    )


@torch.no_grad()
def generate(
    sample_fn: Any, n: int, slices: int, batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """-> (images [n, 1, 28, 28], labels [n], ms per image). Labels cycle through the 10 classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randn((slices, n, 1, 28, 28), generator=g)
    out = []
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        out.append(sample_fn(noise[:, i : i + batch], labels[i : i + batch]))
    ms = (time.perf_counter() - t0) * 1e3 / n
    return torch.cat(out).clamp(-0.5, 0.5), labels, ms


def consistency_fn(model: TrigFlow, times: tuple[float, ...]) -> Any:
    t = torch.tensor(times, dtype=torch.float32)
    return lambda noise, y: consistency_sample(model, noise, y, t)


def teacher_fn(model: TrigFlow, steps: int, sigma_d: float, guidance: float = 1.0) -> Any:
    t = torch.tensor(teacher_times(steps), dtype=torch.float32)

    def velocity(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model.guided_velocity(x, tt, y, guidance)

    return lambda noise, y: ode_sample(velocity, noise[0], y, t, sigma_d)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from models.data import load_split

    if args.quick:
        args.num_samples, args.teacher_steps = min(args.num_samples, 100), min(args.teacher_steps, 4)
    clf = load_classifier(args.classifier)
    x_eval, y_eval = load_split("eval")
    ref = features(clf, x_eval)
    n = args.num_samples
    rows: list[dict[str, Any]] = []

    def row(
        sampler: str, steps: int, x: torch.Tensor, y: torch.Tensor, ms: float | None, w: float = 1.0
    ) -> None:
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "guidance": w,
                "fld": round(frechet_distance(features(clf, x), ref), 3),
                "class_accuracy": round(accuracy(clf, x, y), 4),
                "ms_per_image": None if ms is None else round(ms, 3),
                "num_samples": len(x),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    cm, card = load_checkpoint(args.checkpoint)
    for steps in (int(s) for s in args.steps.split(",") if s):
        x, y, ms = generate(consistency_fn(cm, card.schedules[steps]), n, steps, args.batch_size, args.seed)
        row("consistency", steps, x, y, ms)
        if steps == 2 and args.grid:
            from models.grid import save_grid

            xg, _, _ = generate(consistency_fn(cm, card.schedules[2]), 80, 2, 80, args.seed + 1)
            # generate() cycles labels 0..9, so reorder to 10 rows (classes) x 8 columns (seeds)
            save_grid(xg.view(8, 10, *xg.shape[1:]).transpose(0, 1).reshape_as(xg), 10, args.grid)
    teacher, tcard = load_checkpoint(args.teacher)
    for w in (float(g) for g in args.teacher_guidance.split(",") if g):
        x, y, ms = generate(
            teacher_fn(teacher, args.teacher_steps, tcard.sigma_d, w), n, 1, args.batch_size, args.seed
        )
        row("teacher", args.teacher_steps, x, y, ms, w)
    x_train, _ = load_split("train")
    idx = (
        torch.randint(0, len(x_train), (n,), generator=torch.Generator().manual_seed(args.seed))
        if n > len(x_train)
        else torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:n]
    )
    rows.append(
        {
            "sampler": "real",
            "steps": 0,
            "guidance": None,
            "fld": round(frechet_distance(features(clf, x_train[idx]), ref), 3),
            "class_accuracy": round(accuracy(clf, x_eval, y_eval), 4),
            "ms_per_image": None,
            "num_samples": n,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "checkpoint": card.name, "teacher": tcard.name, "threads": torch.get_num_threads()}


# Candidate re-noising times after t_max, searched by FLD the way the original consistency
# models chose theirs (Song et al. 2023); 1.1 is sCM's two-step setting.
SCHEDULE_CANDIDATES: dict[int, list[tuple[float, ...]]] = {
    2: [(0.7,), (0.8,), (0.9,), (1.0,), (1.1,), (1.2,), (1.3,)],
    3: [(1.1, 0.8), (1.2, 0.8), (1.1, 0.6), (1.3, 0.9)],
    4: [(1.3, 1.1, 0.8), (1.4, 1.1, 0.6), (1.2, 0.9, 0.5), (1.3, 1.0, 0.7)],
}


SEARCH_REFERENCE = 2000  # class-balanced training images the search's FLD is measured against


def balanced_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of n images, n / 10 of each class drawn at random: the search's reference set.
    (The train split is ordered by class, so its first n images would hold only the first few
    classes, and every class-balanced sample set would sit far from them.)"""
    g = torch.Generator().manual_seed(seed)
    per = n // 10
    picks = []
    for c in range(10):
        idx = torch.nonzero(labels == c)[:, 0]
        if len(idx) < per:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {per}")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.cat(picks)


def tune_schedules(args: argparse.Namespace, n: int = 1000) -> dict[str, Any]:
    """FLD of each candidate schedule on n samples, against 2,000 class-balanced *training*
    images (the held-out set stays unseen by the search) with other seeds than the published
    eval; the best per step count is written into the checkpoint card (weights untouched)."""
    from models.checkpoint import card_paths
    from models.data import load_split

    clf = load_classifier(args.classifier)
    x_train, y_train = load_split("train")
    ref = features(clf, x_train[balanced_indices(y_train, SEARCH_REFERENCE)])
    model, card = load_checkpoint(args.checkpoint)
    t_max = card.schedules[1][0]
    found: dict[str, Any] = {}
    for steps, cands in SCHEDULE_CANDIDATES.items():
        scores = []
        for tail in cands:
            times = (t_max, *tail)
            x, _, _ = generate(consistency_fn(model, times), n, steps, args.batch_size, args.seed + 7)
            scores.append((frechet_distance(features(clf, x), ref), times))
            print(
                json.dumps(
                    {"steps": steps, "times": [round(t, 4) for t in times], "fld": round(scores[-1][0], 3)}
                )
            )
        best = min(scores)
        found[str(steps)] = {
            "times": list(best[1]),
            "fld": round(best[0], 3),
            "candidates": [{"times": list(t), "fld": round(f, 3)} for f, t in scores],
        }
    js, _ = card_paths(args.checkpoint)
    raw = json.loads(js.read_text())
    for k, v in found.items():
        raw["schedules"][k] = v["times"]
    metric = f"FLD vs {SEARCH_REFERENCE:,} class-balanced training images"
    raw["provenance"]["schedule_search"] = {"samples": n, "metric": metric, **found}
    # a new card beside the old one (same weights file): replacing a shipped card is a deliberate act
    out = Path(args.tuned_card) if args.tuned_card else js.with_name(js.stem + "-tuned.json")
    if out.resolve().parent != js.resolve().parent:
        raise SystemExit(f"--tuned-card must sit beside {js} (it names the same weights file)")
    out.write_text(json.dumps(raw, indent=2) + "\n")
    load_checkpoint(out)  # still valid
    args.checkpoint = str(out)  # the eval that follows measures the tuned schedules
    print(json.dumps({"tuned_card": str(out)}))
    return found


def main(args: argparse.Namespace) -> None:
    if args.edits:
        from models.eval_edits import main as edits_main

        edits_main(args)
        return
    if args.tune_schedules:
        tune_schedules(args)
    if args.train_classifier:
        from models.classifier import train_classifier

        acc = train_classifier(args.classifier)
        print(json.dumps({"classifier": args.classifier, "heldout_accuracy": acc}))
    result = evaluate(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
