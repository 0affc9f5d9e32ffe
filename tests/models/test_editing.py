"""Zero-shot editing as pure functions and through the engine: the constraint holds, and plain
rows beside edit rows are bit-for-bit what plain sampling gives."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.editing import Constraint, RowEdit, patch_sizes, slerp, strength_times
from models.load import load_model
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings


def test_projection_keeps_pixels_and_patch_means_and_leaves_plain_rows_alone() -> None:
    torch.manual_seed(0)
    c = Constraint.empty(3, (1, 28, 28))
    assert c.patches == (2, 4, 7, 14)
    x0, y = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    c.ref[:] = y
    c.keep[0, :, 14:] = 1.0  # row 0 inpaints the top half, keeps the bottom
    c.patch[1, c.patches.index(7)] = 1.0  # row 1: super-resolution from 4x4 means
    out = c.project(x0)
    assert torch.equal(out[0, :, 14:], y[0, :, 14:]) and torch.equal(out[0, :, :14], x0[0, :, :14])
    torch.testing.assert_close(F.avg_pool2d(out[1:2], 7), F.avg_pool2d(y[1:2], 7), atol=1e-6, rtol=0)
    # what is free moves as little as it can: the patch's deviations from its mean are x0's
    dev = out[1:2] - F.avg_pool2d(out[1:2], 7).repeat_interleave(7, -1).repeat_interleave(7, -2)
    dev0 = x0[1:2] - F.avg_pool2d(x0[1:2], 7).repeat_interleave(7, -1).repeat_interleave(7, -2)
    torch.testing.assert_close(dev, dev0, atol=1e-6, rtol=0)
    assert torch.equal(out[2], x0[2])  # a plain row: bit for bit


def test_patch_sizes_and_strength_times() -> None:
    assert patch_sizes(28) == (2, 4, 7, 14) and patch_sizes(8) == (2, 4) and patch_sizes(64)[-1] == 32
    from models.checkpoint import load_checkpoint
    from server.settings import DEFAULT_CHECKPOINT

    info = load_checkpoint(DEFAULT_CHECKPOINT)[1].info()
    full = strength_times(info, 2, 1.0)
    assert full == pytest.approx(info.schedules[2])  # strength 1: the model's own schedule
    half = strength_times(info, 2, 0.5)
    assert half[0] == pytest.approx(math.pi / 4) and half[1] / half[0] == pytest.approx(full[1] / full[0])


def test_slerp_ends_are_the_seeds_noises_exactly() -> None:
    a, b = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() - a.norm()) / a.norm() < 0.2  # the norm of a Gaussian sample, not shrunk
    assert (mid.norm() - ((a + b) / 2).norm()) > 0


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> Engine:
    e = Engine(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 4, 8]), Metrics())
    e.warmup()
    return e


def test_edit_rows_share_a_batch_with_plain_rows_without_touching_them(engine: Engine) -> None:
    torch.manual_seed(1)
    ref = torch.rand(1, 28, 28) - 0.5
    keep = torch.zeros(1, 28, 28)
    keep[:, 14:] = 1.0
    low = F.avg_pool2d(ref[None], 4)[0].repeat_interleave(4, -1).repeat_interleave(4, -2)
    edits: list[RowEdit | None] = [
        None,
        RowEdit("inpaint", ref=ref, keep=keep),
        None,
        RowEdit("superres", ref=low, patch=4),
        RowEdit("variation", ref=ref, strength=0.3),
        None,
    ]
    labels: list[int | None] = [3, 3, None, 3, 3, 7]
    seeds = [10, 11, 12, 13, 14, 15]
    for steps in (1, 2, 4):
        mixed = engine.call(engine.sample, steps, labels, seeds, None, edits)
        plain = engine.call(engine.sample, steps, labels, seeds)
        for i in (0, 2, 5):
            assert torch.equal(mixed[i], plain[i]), (steps, i)
        assert torch.equal(mixed[1, :, 14:], ref[:, 14:])  # known pixels back exactly
        # the known half steers the rest from the second step on (step 1 starts from pure noise)
        assert torch.equal(mixed[1, :, :14], plain[1, :, :14]) == (steps == 1)
        torch.testing.assert_close(F.avg_pool2d(mixed[3:4], 4), F.avg_pool2d(low[None], 4), atol=1e-5, rtol=0)
        # a low-strength variation stays near its input; the same seed from noise does not
        assert (mixed[4] - ref).abs().mean() < (plain[4] - ref).abs().mean()
    # the slot is clean again for plain batches after an edit batch
    again = engine.call(engine.sample, 2, labels, seeds)
    assert torch.equal(again, engine.call(engine.sample, 2, labels, seeds))


def test_interpolation_frames_end_at_the_two_seeds(engine: Engine) -> None:
    edits: list[RowEdit | None] = [RowEdit("interpolate", seed_b=99, alpha=a) for a in (0.0, 0.5, 1.0)]
    frames = engine.call(engine.run_batch, 2, [4, 4, 4], [5, 5, 5], None, edits)
    ends = engine.call(engine.run_batch, 2, [4, 4], [5, 99])
    assert np.array_equal(frames[0], ends[0]) and np.array_equal(frames[2], ends[1])
    assert not np.array_equal(frames[1], frames[0])


def test_edm_family_edits_too(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from tests.models.diffusers_fixtures import save_cm_dir

    path = save_cm_dir(tmp_path / "cd", 3, {"schedules": {"2": [22, 0]}})
    e = Engine(Settings(models=[str(path)], buckets=[2]), Metrics())
    e.warmup()
    ref = torch.rand(3, 8, 8) * 2 - 1
    keep = torch.zeros(3, 8, 8)
    keep[:, :, :4] = 1.0
    edits: list[RowEdit | None] = [
        RowEdit("inpaint", ref=ref, keep=keep),
        RowEdit("variation", ref=ref, strength=0.4),
    ]
    x = e.call(e.sample, 2, [0, 1], [1, 2], None, edits)
    assert torch.equal(x[0, :, :, :4], ref[:, :, :4])
    # colorization keeps the gray input's luma and generates the chroma
    from models.editing import LUMA

    gray = torch.rand(1, 8, 8) * 1.6 - 0.8
    col = e.call(
        e.sample, 2, [2, 2], [3, 4], None, [RowEdit("colorize", ref=gray.expand(3, -1, -1).clone())] * 2
    )
    w = LUMA / LUMA.sum()  # BT.601 weights, summing to 1
    torch.testing.assert_close(
        (col * w.reshape(1, 3, 1, 1)).sum(1), gray.expand(2, -1, -1), atol=1e-5, rtol=0
    )
    assert (col[0] - col[1]).abs().max() > 1e-3  # the chroma is generated (per seed)
    model, info = load_model(path)
    assert strength_times(info, 2, 0.4)[0] == pytest.approx(0.5 * math.tan(0.4 * math.pi / 2), rel=1e-6)
    e.close()


def test_eval_edits_quick(tmp_path: Path) -> None:
    """`cmserve eval --edits --quick`: every task at every step count, the baselines, the grid."""
    import argparse

    from models.eval_edits import evaluate_edits, markdown
    from models.evaluate import WEIGHTS

    args = argparse.Namespace(
        checkpoint=str(WEIGHTS / "cm-mnist.json"), classifier=str(WEIGHTS / "lenet-mnist.safetensors"),
        num_samples=500, quick=True, steps="1,2", seed=0, batch_size=250, grid=str(tmp_path / "g.png"),
    )  # fmt: skip
    result = evaluate_edits(args)
    got = {(r["task"], r["method"], r["steps"]) for r in result["rows"]}
    for task in ("inpaint bottom half", "super-resolution 7x7"):
        assert {(task, "consistency", 1), (task, "consistency", 2)} <= got
    assert ("inpaint bottom half", "class-mean fill", None) in got and (
        "super-resolution 7x7",
        "bicubic",
        None,
    ) in got
    assert all(0 <= r["accuracy"] <= 1 and r["rmse"] > 0 for r in result["rows"])
    assert (tmp_path / "g.png").stat().st_size > 1000 and "| inpaint bottom half |" in markdown(result)
