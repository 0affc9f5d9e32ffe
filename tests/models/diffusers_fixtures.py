"""Tiny randomly initialised diffusers consistency-model directories, built in code (nothing is
downloaded): the anchor the edm family is checked against."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER = {"num_train_timesteps": 40, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "s_noise": 1.0, "rho": 7.0, "clip_denoised": True}  # fmt: skip


def tiny_unet(num_classes: int | None, seed: int = 0, sample_size: int = 8):  # type: ignore[no-untyped-def]
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_classes,
    )
    with torch.no_grad():  # lift every weight off zero, so each part of the network counts
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet.eval()


def save_cm_dir(path: Path, num_classes: int | None, card: dict | None = None, seed: int = 0) -> Path:  # type: ignore[type-arg]
    """A ConsistencyModelPipeline directory: unet/, scheduler/ and, given one, a cmserve.json card."""
    from diffusers import CMStochasticIterativeScheduler

    tiny_unet(num_classes, seed).save_pretrained(path / "unet", safe_serialization=True)
    CMStochasticIterativeScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    if card is not None:
        (path / "cmserve.json").write_text(json.dumps(card))
    return path
