"""An untrained tiny checkpoint the code builds itself (tests, and a fallback with no weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import ModelCard, save_checkpoint
from models.config import PRESETS
from models.consistency import DEFAULT_SCHEDULES, SIGMA_D, TrigFlow
from models.dit import DiT

PLACEHOLDER_NAME = "placeholder-untrained"


def random_dit(arch: str, seed: int = 0) -> DiT:
    """A DiT of preset `arch` with random weights everywhere: the zero-initialized adaLN and
    output layers too, so the output depends on the network and the label (and speed tests never
    multiply zeros, which some GPUs do faster)."""
    torch.manual_seed(seed)
    net = DiT(PRESETS[arch])
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(0.0, 0.02)
    return net


def build_placeholder(path: str | Path, seed: int = 0, arch: str = "tiny") -> Path:
    """Random weights (`random_dit`); draws noise-like images, not digits."""
    net = random_dit(arch, seed)
    card = ModelCard(
        name=PLACEHOLDER_NAME,
        kind="consistency",
        arch=PRESETS[arch],
        class_names=tuple(str(i) for i in range(PRESETS[arch].num_classes)),
        sigma_d=SIGMA_D,
        schedules=dict(DEFAULT_SCHEDULES),
        provenance={
            "placeholder": True,
            "note": "untrained random weights built by the code; not a real model",
        },
    )
    return save_checkpoint(path, TrigFlow(net, SIGMA_D), card)
