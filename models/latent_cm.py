"""Latent consistency models (LCM: a Stable-Diffusion UNet distilled to a few steps) saved in
diffusers' `LatentConsistencyModelPipeline` layout, served as the `latent` family:

    DIR/model_index.json
    DIR/unet/          UNet2DConditionModel (with `time_cond_proj_dim`: the guidance embedding)
    DIR/scheduler/     LCMScheduler
    DIR/vae/           AutoencoderKL
    DIR/text_encoder/  CLIPTextModel
    DIR/tokenizer/     CLIPTokenizer

The conditioning is a prompt and a guidance scale w. The sampler, runner and buffers of the
other families carry a row's condition as an integer `label`; here that label is a slot of an
LRU table of text embeddings (`condition` writes it on the compute thread), so the network reads
`table[label]`, a gather that a CUDA graph captures like any other op. In LCM's scheduler terms,
with ᾱ the cumulative alphas and t an integer timestep:

    denoise(x, t) = c_skip(t)·x + c_out(t)·x̂0,   x̂0 = (x − √(1−ᾱ_t)·ε̂) / √ᾱ_t (ε-prediction)
    renoise(x0, z, t) = √ᾱ_t·x0 + √(1−ᾱ_t)·z,     start(z, t) = z
    c_skip = σ²/((10 t)² + σ²), c_out = 10 t / √((10 t)² + σ²), σ = 0.5

and the image is the VAE's decoding of the last x0. Needs the `latent` extra
(`pip install 'cmserve[latent]'`: diffusers and transformers); imported only for such a directory.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError
from models.interface import ModelInfo

PIPELINE = "LatentConsistencyModelPipeline"
PARTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
DEFAULT_STEPS = (1, 2, 4, 8)
CACHE_SLOTS = 256  # text-embedding table rows (distinct (prompt, w) pairs kept)


def is_layout(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE
    except (OSError, ValueError):
        return False


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale: sinusoids of (w − 1)·1000. w: [B] -> [B, dim]."""
    w = (w - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w.float()[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TableFull(RuntimeError):
    """Every row of the text table holds a prompt of a request still queued or running."""


class TextConditions:
    """An LRU table of (prompt, w) -> row: the text encoder's last hidden state and the guidance
    embedding. A row in use by a queued or running request is pinned (never evicted)."""

    def __init__(self, encoder: Any, tokenizer: Any, w_dim: int, slots: int, device: torch.device) -> None:
        self.encoder, self.tokenizer, self.w_dim = encoder, tokenizer, w_dim
        self.max_tokens = int(tokenizer.model_max_length)
        hidden = int(encoder.config.hidden_size)
        self.emb = torch.zeros((slots, self.max_tokens, hidden), device=device)
        self.w = torch.zeros((slots, max(w_dim, 1)), device=device)
        self._rows: OrderedDict[tuple[str, float], int] = OrderedDict()
        self._pins = [0] * slots
        self._truncated: dict[int, bool] = {}
        self.hits = self.misses = 0

    def tokens(self, prompt: str) -> tuple[torch.Tensor, bool]:
        """Token ids [1, max_tokens] (padded, truncated as the pipeline does), and whether the
        prompt was cut."""
        full = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        return ids, full.shape[-1] > self.max_tokens

    @torch.inference_mode()
    def acquire(self, prompt: str, w: float) -> tuple[int, bool]:
        """The row holding (prompt, w), encoding it on a miss; pinned until `release`.
        -> (row, whether the prompt was truncated). On the compute thread."""
        key = (prompt, float(w))
        row = self._rows.get(key)
        if row is not None:
            self.hits += 1
            self._rows.move_to_end(key)
        else:
            self.misses += 1
            row = self._free_row()
            ids, cut = self.tokens(prompt)
            dev = self.emb.device
            self.emb[row] = self.encoder(ids.to(dev))[0][0].to(self.emb.dtype)
            if self.w_dim:
                self.w[row] = guidance_embedding(torch.tensor([float(w)], device=dev), self.w_dim)[0]
            self._rows[key] = row
            self._truncated[row] = cut
        self._pins[row] += 1
        return row, self._truncated[row]

    def release(self, row: int) -> None:
        self._pins[row] = max(0, self._pins[row] - 1)

    def _free_row(self) -> int:
        used = set(self._rows.values())
        for r in range(len(self._pins)):
            if r not in used:
                return r
        for key, r in self._rows.items():  # least recently used first
            if not self._pins[r]:
                del self._rows[key]
                return r
        raise TableFull(f"all {len(self._pins)} text-embedding rows hold prompts of queued requests")


class LatentConsistency(nn.Module):
    """A `ConsistencyModel` (models/interface.py) over an LCM UNet, VAE and text encoder."""

    alphas_cumprod: torch.Tensor

    def __init__(
        self, unet: Any, vae: Any, conditions: TextConditions, scheduler_config: dict[str, Any]
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.conditions = unet, vae, conditions
        betas = _betas(scheduler_config)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0), persistent=False)
        self.prediction = scheduler_config.get("prediction_type", "epsilon")
        self.scale_t = float(scheduler_config.get("timestep_scaling", 10.0))
        self.sigma = 0.5  # LCMScheduler's sigma_data
        self.vae_scale = float(vae.config.scaling_factor)
        self.compute_dtype = torch.float32

    def cast_network(self, dtype: torch.dtype) -> LatentConsistency:
        if dtype == torch.float8_e4m3fn:
            raise ValueError("float8 serves the DiT family only (models/fp8.py)")
        self.unet.to(dtype)
        self.vae.to(dtype)
        self.compute_dtype = dtype
        return self

    def _acp(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t.long()]
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.conditions.emb[labels].to(self.compute_dtype)
        w = self.conditions.w[labels].to(self.compute_dtype) if self.conditions.w_dim else None
        # [B, 4, h, w]: the UNet's ε (or v, or x0) for each row, at its own timestep and prompt
        out = self.unet(x_t.to(self.compute_dtype), t, encoder_hidden_states=cond, timestep_cond=w).sample
        out = out.to(x_t.dtype)
        a = self._acp(t, x_t)
        if self.prediction == "epsilon":
            x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
        elif self.prediction == "v_prediction":
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        else:
            x0 = out
        st = (t * self.scale_t).reshape(a.shape)
        c_skip = self.sigma**2 / (st**2 + self.sigma**2)
        c_out = st / (st**2 + self.sigma**2).sqrt()
        return c_out * x0 + c_skip * x_t

    def start(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return z

    def renoise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._acp(t.expand(x0.shape[0]) if t.dim() == 0 else t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * z

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (not clipped)."""
        return self.vae.decode((x0 / self.vae_scale).to(self.compute_dtype)).sample.to(x0.dtype)


def _betas(cfg: dict[str, Any]) -> torch.Tensor:
    n = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    raise CheckpointError(f"LCM scheduler beta_schedule {kind!r} is not supported (scaled_linear, linear)")


def load_latent_cm(
    path: Path, device: str | torch.device = "cpu", name: str | None = None, cache_slots: int = CACHE_SLOTS
) -> tuple[LatentConsistency, ModelInfo]:
    try:
        from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    except ImportError as e:
        raise CheckpointError(
            f"{path}: serving an LCM directory needs `pip install 'cmserve[latent]'` ({e})"
        ) from None
    missing = [p for p in PARTS if not (path / p).is_dir()]
    if missing:
        raise CheckpointError(f"{path}: an LCM directory needs {list(PARTS)}; it lacks {missing}")
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        str(path),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        use_safetensors=True,
    )
    unet, vae = pipe.unet.eval().requires_grad_(False), pipe.vae.eval().requires_grad_(False)
    text = pipe.text_encoder.eval().requires_grad_(False)
    dev = torch.device(device)
    w_dim = int(unet.config.time_cond_proj_dim or 0)
    conditions = TextConditions(text.to(dev), pipe.tokenizer, w_dim, cache_slots, dev)
    sched_cfg = dict(pipe.scheduler.config)
    model = LatentConsistency(unet, vae, conditions, sched_cfg).to(dev).eval()
    schedules: dict[int, tuple[float, ...]] = {}
    for steps in DEFAULT_STEPS:
        s = LCMScheduler.from_config(sched_cfg)
        s.set_timesteps(steps)
        schedules[steps] = tuple(float(t) for t in s.timesteps)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = int(unet.config.sample_size)
    info = ModelInfo(
        name=name or path.name,
        family="latent",
        kind="consistency",
        channels=int(vae.config.out_channels),
        image_size=latent * factor,
        class_names=(),
        schedules=schedules,
        value_range=(-1.0, 1.0),
        default_steps=4,
        provenance={"layout": PIPELINE, "path": str(path)},
        time_name="timestep",
        conditioning_text=True,
        latent_shape=(int(unet.config.in_channels), latent, latent),
    )
    return model, info
