"""One entry point from a path to a servable model, whichever layout the path holds."""

from __future__ import annotations

from pathlib import Path

import torch

from models import diffusers_cm, latent_cm
from models.checkpoint import CheckpointError, card_paths, load_checkpoint
from models.interface import ConsistencyModel, ModelInfo

LAYOUTS = (
    "a cmserve checkpoint (NAME.json card beside NAME.safetensors: the trigflow family)",
    "a diffusers ConsistencyModelPipeline directory (unet/config.json, "
    "unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json: the edm family)",
    "a diffusers LatentConsistencyModelPipeline directory (model_index.json, unet/, scheduler/, vae/, "
    "text_encoder/, tokenizer/: the latent family, prompted)",
)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", name: str | None = None
) -> tuple[ConsistencyModel, ModelInfo]:
    """-> (model in eval mode on `device`, its info, served as `name` or the model's own name).
    Raises CheckpointError naming the layouts understood and what the path lacks."""
    p = Path(path)
    if latent_cm.is_layout(p):  # before the CM test: an LCM directory also has unet/ and scheduler/
        return latent_cm.load_latent_cm(p, device, name)
    if diffusers_cm.is_layout(p):
        return diffusers_cm.load_diffusers_cm(p, device, name)
    js, _ = card_paths(p)
    if js.is_file():
        model, card = load_checkpoint(js, device)
        return model, card.info(name)
    if p.is_dir():
        lacks = f"it has no {diffusers_cm.UNET_FILES[0]} nor {diffusers_cm.SCHEDULER_FILE}"
    else:
        lacks = f"neither {js} nor {p} exists" if not p.exists() else f"{js.name} is missing"
    raise CheckpointError(
        f"{p}: not a model this server can load ({lacks}); it understands " + "; ".join(LAYOUTS)
    )
