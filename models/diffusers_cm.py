"""Song et al. consistency models saved in diffusers' `ConsistencyModelPipeline` layout:

    DIR/unet/config.json                              UNet2DModel
    DIR/unet/diffusion_pytorch_model.safetensors
    DIR/scheduler/scheduler_config.json               CMStochasticIterativeScheduler
    DIR/cmserve.json                                  optional card (below)

served as an `edm`-family model. The schedules come from the scheduler config: s steps = Karras
grid indices 0, N//s, 2N//s, ... (what the pipeline runs for `num_inference_steps=s`). The card
may name the model, its classes, a default step count and its own schedules, written as the
pipeline's `timesteps` argument (grid indices, descending; the openai ImageNet-64 CD models
sample 2 steps at [22, 0]):

    {"name": "cd-imagenet64", "classes": ["tench", ...], "default_steps": 2,
     "schedules": {"1": [0], "2": [22, 0]}}

Needs the `diffusers` extra (`pip install 'cmserve[diffusers]'`); imported only when such a
directory is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError
from models.edm import EDMConfig, EDMConsistency
from models.interface import ModelInfo

UNET_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors")
SCHEDULER_FILE = "scheduler/scheduler_config.json"
CARD_FILE = "cmserve.json"
DEFAULT_STEPS = (1, 2, 3, 4)
MAX_SIGMA = 1e4  # σ_max beyond this is no EDM-family schedule we know of (the openai models: 80)


def is_layout(path: Path) -> bool:
    return path.is_dir() and ((path / "unet").is_dir() or (path / "scheduler").is_dir())


def missing_files(path: Path) -> list[str]:
    return [f for f in (*UNET_FILES, SCHEDULER_FILE) if not (path / f).is_file()]


def _json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return raw


def edm_config(sched: dict[str, Any], where: str) -> EDMConfig:
    """The scheduler config -> EDMConfig, refusing what the family cannot sample as written."""
    if sched.get("_class_name") != "CMStochasticIterativeScheduler":
        raise CheckpointError(
            f"{where}: scheduler is {sched.get('_class_name')!r}; the edm family needs "
            "CMStochasticIterativeScheduler"
        )
    if float(sched.get("s_noise", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: s_noise {sched['s_noise']} is not supported (only 1.0)")
    try:
        cfg = EDMConfig(
            sigma_min=float(sched.get("sigma_min", 0.002)),
            sigma_max=float(sched.get("sigma_max", 80.0)),
            sigma_data=float(sched.get("sigma_data", 0.5)),
            rho=float(sched.get("rho", 7.0)),
            grid_size=int(sched.get("num_train_timesteps", 40)),
            clip_denoised=bool(sched.get("clip_denoised", True)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    if not (math.isfinite(cfg.sigma_max) and cfg.sigma_max <= MAX_SIGMA):
        raise CheckpointError(f"{where}: sigma_max {cfg.sigma_max} is outside (0, {MAX_SIGMA:g}]")
    return cfg


def schedules_of(cfg: EDMConfig, card: dict[str, Any], where: str) -> dict[int, tuple[float, ...]]:
    """Step count -> σ values, from the card's grid indices or the scheduler's default spacing."""
    given = card.get("schedules")
    if given is None:
        return {s: cfg.karras_sigmas(cfg.default_indices(s)) for s in DEFAULT_STEPS if s <= cfg.grid_size}
    if not isinstance(given, dict) or not given:
        raise CheckpointError(f"{where}: 'schedules' must map step counts to lists of grid indices")
    out = {}
    for k, idx in given.items():
        ok = isinstance(idx, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
        if not (ok and str(k).isdigit() and int(k) == len(idx) >= 1):
            raise CheckpointError(f"{where}: schedule {k!r} must be {k} grid indices, got {idx!r}")
        if idx != sorted(idx, reverse=True) or 0 not in idx:
            raise CheckpointError(
                f"{where}: schedule {k} {idx}: indices must descend and end at 0 (σ_max: sampling "
                "starts from pure noise there)"
            )
        try:
            out[int(k)] = cfg.karras_sigmas(idx)
        except ValueError as e:
            raise CheckpointError(f"{where}: schedule {k}: {e}") from None
    return out


class UNetNetwork(nn.Module):
    """diffusers' UNet2DModel as a plain F(x, c_noise, labels) -> tensor."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels=labels, return_dict=False)[0]


def load_unet(unet_dir: Path) -> nn.Module:
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise CheckpointError(
            f"{unet_dir.parent}: a diffusers model directory needs the diffusers package: "
            "pip install 'cmserve[diffusers]'"
        ) from None
    try:
        return UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{unet_dir}: cannot load the UNet2DModel: {e}") from None


def load_diffusers_cm(
    path: str | Path, device: str | torch.device = "cpu", name: str | None = None
) -> tuple[EDMConsistency, ModelInfo]:
    """Load and check a ConsistencyModelPipeline directory -> (model in eval mode, info)."""
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{path}: not a complete ConsistencyModelPipeline directory: missing {missing}")
    ucfg = _json(path / UNET_FILES[0])
    if ucfg.get("_class_name") != "UNet2DModel":
        raise CheckpointError(f"{path / UNET_FILES[0]}: {ucfg.get('_class_name')!r} is not a UNet2DModel")
    cfg = edm_config(_json(path / SCHEDULER_FILE), str(path / SCHEDULER_FILE))
    card_path = path / CARD_FILE
    card = _json(card_path) if card_path.is_file() else {}
    where = str(card_path)

    size = ucfg.get("sample_size")
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise CheckpointError(f"{path}: sample_size {size}: only square images are served")
        size = size[0]
    levels = len(ucfg.get("down_block_types", ())) - 1
    if not isinstance(size, int) or size < 1 or size % (2**levels):
        raise CheckpointError(
            f"{path}: sample_size {size!r} must be a positive multiple of {2**levels} "
            f"(the UNet halves the image {levels} times)"
        )
    channels = ucfg.get("in_channels", 3)
    if ucfg.get("out_channels", 3) != channels:
        raise CheckpointError(f"{path}: in_channels {channels} != out_channels {ucfg.get('out_channels')}")
    num_classes = ucfg.get("num_class_embeds") or 0
    classes = card.get("classes", [str(i) for i in range(num_classes)])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{where}: 'classes' must be a list of names")
    if len(classes) != num_classes:
        raise CheckpointError(
            f"{where}: names {len(classes)} classes but the UNet embeds {num_classes} (num_class_embeds)"
        )
    schedules = schedules_of(cfg, card, where)
    default = card.get("default_steps")
    if default is not None and default not in schedules:
        raise CheckpointError(f"{where}: default_steps {default!r} is not one of {sorted(schedules)}")

    unet = load_unet(path / "unet")
    for k, v in unet.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}/unet: tensor {k} holds non-finite values")
    model = EDMConsistency(UNetNetwork(unet), cfg, class_conditional=num_classes > 0)
    model = model.to(device).eval().requires_grad_(False)
    info = ModelInfo(
        name=name or str(card.get("name") or path.name),
        family="edm",
        kind="consistency",
        channels=int(channels),
        image_size=size,
        class_names=tuple(classes),
        schedules=schedules,
        value_range=(-1.0, 1.0),
        null_label=None,
        default_steps=default,
        provenance={
            "source": "diffusers ConsistencyModelPipeline",
            "path": str(path),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "edm": {
                "sigma_min": cfg.sigma_min,
                "sigma_max": cfg.sigma_max,
                "sigma_data": cfg.sigma_data,
                "rho": cfg.rho,
                "grid_size": cfg.grid_size,
                "clip_denoised": cfg.clip_denoised,
            },
            **({"card": card.get("provenance")} if isinstance(card.get("provenance"), dict) else {}),
        },  # fmt: skip
        time_name="sigma",
        sigma_data=cfg.sigma_data,
    )
    return model, info
