"""Training: a few tiny steps lower the loss; an interrupted run resumes to the same state;
`cmserve eval --quick` runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from models.losses import v_loss
from models.train import run
from tests.procs import ROOT


def _fixed_loss(model) -> float:  # type: ignore[no-untyped-def]
    from models.data import load_split

    g = torch.Generator().manual_seed(99)
    x, y = load_split("train")
    x0, y = x[:64], y[:64]
    z = torch.randn(x0.shape, generator=g)
    t = torch.atan(torch.exp(-1.0 + 1.4 * torch.randn(64, generator=g)) / 0.5)
    with torch.no_grad():
        return float(v_loss(model, x0, y, z, t))


def test_a_few_tiny_teacher_steps_lower_the_loss(tmp_path: Path) -> None:
    trainer = run("tiny", str(tmp_path / "a"), {"teacher_steps": 1, "ect_steps": 0, "sample_every": 0})
    start = _fixed_loss(trainer.model)
    trainer = run(
        "tiny",
        str(tmp_path / "b"),
        {"teacher_steps": 40, "ect_steps": 0, "sample_every": 0, "teacher_lr": 3e-3},
    )
    assert _fixed_loss(trainer.model) < 0.9 * start


def test_training_resumes_to_the_same_state(tmp_path: Path) -> None:
    straight = run("tiny", str(tmp_path / "straight"))
    run("tiny", str(tmp_path / "resumed"), stop_after=5)  # stops mid-teacher, state saved
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)
    assert state["step"] == 5
    resumed = run("tiny", str(tmp_path / "resumed"))  # picks up at step 5, crosses into ECT
    assert resumed.step == straight.step == 10
    for (k, a), (_, b) in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().items()):
        assert torch.equal(a, b), k
    # and the exports are real checkpoints
    model, card = load_checkpoint(tmp_path / "resumed" / "consistency")
    assert card.kind == "consistency" and card.provenance["training_steps"] == 10
    _, tcard = load_checkpoint(tmp_path / "resumed" / "teacher")
    assert tcard.kind == "diffusion" and 32 in tcard.schedules


def test_eval_quick_runs_end_to_end(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "eval",
            "--quick",
            "--checkpoint",
            str(tiny_ckpt),
            "--teacher",
            str(tiny_ckpt),
            "--json",
            str(out),
            "--grid",
            str(tmp_path / "grid.png"),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("consistency", 1),
        ("consistency", 2),
        ("consistency", 4),
        ("teacher", 4),
        ("real", 0),
    ]
    for r in rows:
        assert set(r) == {
            "sampler",
            "steps",
            "guidance",
            "fld",
            "class_accuracy",
            "ms_per_image",
            "num_samples",
        }
        assert r["num_samples"] == 100 and r["fld"] >= 0 and 0 <= r["class_accuracy"] <= 1
    real = rows[-1]
    assert real["class_accuracy"] > 0.9  # the classifier on held-out real digits
    assert rows[1]["fld"] > 3 * real["fld"]  # an untrained model is far from the data
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_consistency_distillation_moves_toward_the_guided_teacher(tiny_ckpt: Path, tmp_path: Path) -> None:
    """CD from a guided teacher: the loss is finite, the student's weights move from where they
    started, and the export records the recipe and the guidance; the target depends on w."""
    cd = {
        "distill": "cd",
        "cd_teacher": str(tiny_ckpt),
        "cd_guidance": 3.0,
        "ect_steps": 4,
        "sample_every": 0,
    }
    trainer = run("tiny", str(tmp_path / "cd"), cd, from_teacher=str(tiny_ckpt))
    start, _ = load_checkpoint(tiny_ckpt)
    pairs = zip(trainer.model.parameters(), start.parameters(), strict=True)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in pairs)
    assert moved > 0
    _, card = load_checkpoint(tmp_path / "cd" / "consistency")
    assert card.kind == "consistency" and "w = 3.0" in card.provenance["recipe"]
    assert card.provenance["train_config"]["distill"] == "cd"
    x = torch.randn(4, 1, 28, 28)
    t, y = torch.full((4,), 1.0), torch.tensor([1, 2, 3, 10])
    teacher = trainer.cd_teacher
    assert teacher is not None
    v1, v3 = teacher.guided_velocity(x, t, y, 1.0), teacher.guided_velocity(x, t, y, 3.0)
    assert (v1[:3] - v3[:3]).abs().max() > 1e-4  # guidance changes labelled rows
    assert torch.allclose(v1[3], v3[3], atol=1e-5)  # and leaves the null class alone


def test_distill_must_be_known(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="distill"):
        run("tiny", str(tmp_path / "x"), {"distill": "sct"})


def test_schedule_search_reference_is_class_balanced() -> None:
    """The train split is ordered by class: a prefix of it would be a few classes only."""
    import pytest

    from models.data import load_split
    from models.evaluate import balanced_indices

    _, labels = load_split("train")
    assert torch.bincount(labels[:2000], minlength=10)[5:].sum() == 0  # why a prefix will not do
    idx = balanced_indices(labels, 2000)
    assert len(set(idx.tolist())) == 2000
    assert torch.bincount(labels[idx], minlength=10).tolist() == [200] * 10
    assert torch.equal(balanced_indices(labels, 2000), idx)  # the same set on every call
    with pytest.raises(ValueError, match="fewer than"):
        balanced_indices(labels[:500], 200)


def test_tune_schedules_writes_a_new_card(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The search leaves the card it read alone and writes its choice into a card beside it."""
    import argparse
    import shutil

    from models.evaluate import add_args, tune_schedules

    ckpt = tmp_path / "tiny.json"
    shutil.copy(tiny_ckpt, ckpt)
    shutil.copy(tiny_ckpt.with_suffix(".safetensors"), tmp_path / "tiny.safetensors")
    before = ckpt.read_text()
    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args(["--checkpoint", str(ckpt), "--batch-size", "50"])
    found = tune_schedules(args, n=20)
    assert ckpt.read_text() == before
    tuned = tmp_path / "tiny-tuned.json"
    _, card = load_checkpoint(tuned)
    assert args.checkpoint == str(tuned)
    for steps, best in found.items():
        assert list(card.schedules[int(steps)]) == best["times"]
    assert "schedule_search" in card.provenance
