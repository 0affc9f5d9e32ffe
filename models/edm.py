"""EDM parametrization of a consistency model (Song et al. 2023, appendix C; Karras et al. 2022).

f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), y) with, ε = σ_min,
    c_skip = σ_d² / ((σ − ε)² + σ_d²),  c_out = (σ − ε)·σ_d / √(σ² + σ_d²),
    c_in = 1 / √(σ² + σ_d²),            c_noise = 250·ln(σ)   (the openai checkpoints' time input)
so f(x, ε) = x (the boundary condition). Sampling (Alg. 1): x = σ_max·z, then after each denoise
re-noise to the next σ with x = x0 + √(σ² − ε²)·z. Times are σ values; schedules are taken from
EDM's Karras grid (ρ = 7) the way the checkpoints' own schedulers index it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class EDMConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    grid_size: int = 40  # N: the Karras grid the schedules index (index 0 = σ_max, N − 1 = σ_min)
    clip_denoised: bool = True  # clamp every x0 estimate to the data range [-1, 1]

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not (self.sigma_data > 0 and self.rho > 0 and self.grid_size >= 2):
            raise ValueError("sigma_data and rho must be positive and the grid at least 2 points")

    def karras_sigmas(self, indices: list[int]) -> tuple[float, ...]:
        """σ of grid points `indices` (any order), returned descending: index i of N sits at
        ramp i/(N − 1) between σ_max^(1/ρ) and σ_min^(1/ρ), raised to ρ. Computed in float64
        and rounded to fp32 once, as the runner stores them."""
        n = self.grid_size
        if any(not 0 <= i < n for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"grid indices must be distinct and in [0, {n - 1}], got {indices}")
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        ramp = torch.tensor(sorted(indices), dtype=torch.float64) / (n - 1)
        sig = (hi + ramp * (lo - hi)) ** self.rho
        return tuple(sig.float().tolist())

    def default_indices(self, steps: int) -> list[int]:
        """Grid indices of a `steps`-step schedule when none is given: equally spaced from 0,
        N // steps apart (diffusers' CMStochasticIterativeScheduler without custom timesteps)."""
        ratio = self.grid_size // steps
        return [i * ratio for i in range(steps)]


class EDMConsistency(nn.Module):
    """Wraps a network F(x_in, c_noise, y) into the consistency function of a σ-time model.

    `net` is called as net(x, c_noise [B] fp32, labels [B] int64, or None for an unconditional
    network) and returns F in x's layout.
    """

    def __init__(self, net: nn.Module, cfg: EDMConfig, *, class_conditional: bool) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.class_conditional = class_conditional
        self.compute_dtype = torch.float32

    def cast_network(self, dtype: torch.dtype) -> EDMConsistency:
        if dtype == torch.float8_e4m3fn:
            raise ValueError("float8 serves the DiT family only (models/fp8.py)")
        self.net.to(dtype)
        self.compute_dtype = dtype
        return self

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] at noise level sigma [B] -> x0 [B, C, H, W]."""
        c = self.cfg
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        var = s**2 + c.sigma_data**2
        c_skip = c.sigma_data**2 / ((s - c.sigma_min) ** 2 + c.sigma_data**2)
        c_out = (s - c.sigma_min) * c.sigma_data / var**0.5
        x_in = (x / var**0.5).to(self.compute_dtype)
        c_noise = 250.0 * torch.log(sigma)
        F = self.net(x_in, c_noise, labels if self.class_conditional else None).to(x.dtype)
        x0 = c_out * F + c_skip * x
        return x0.clamp(-1.0, 1.0) if c.clip_denoised else x0

    # models.interface.ConsistencyModel
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self(x_t, t, labels)

    def start(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x = σ_0·z (σ_0 = σ_max: every schedule starts there). t: 0-d or [B]."""
        return t.reshape(-1, *([1] * (z.dim() - 1))) * z

    def renoise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x = x0 + √(σ² − σ_min²)·z, σ clamped into [σ_min, σ_max]. t: 0-d or [B]."""
        s = t.clamp(self.cfg.sigma_min, self.cfg.sigma_max).reshape(-1, *([1] * (z.dim() - 1)))
        return x0 + z * (s**2 - self.cfg.sigma_min**2) ** 0.5
