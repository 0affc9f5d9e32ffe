"""TrigFlow parametrization (Lu & Song 2024, "sCM") around a noise-agnostic network.

Forward process: x_t = cos(t)·x0 + sin(t)·σ_d·z, z ~ N(0, I), t ∈ [0, π/2].
Consistency function (sCM eq. 6): f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F(x_t/σ_d, t);
at t = 0 it is x_t exactly, whatever F is (the boundary condition).
"""

from __future__ import annotations

import math

import torch
from torch import nn

SIGMA_D = 0.5
T_MAX = math.atan(80.0 / SIGMA_D)  # σ = σ_d·tan(t) = 80, the EDM σ_max  (≈ 1.5645)

# Re-noising times per step count for a newly trained model; step 1 always starts at t_max, two
# steps re-noise at t_mid = 1.1 as every sCM table does. `cmserve eval --tune-schedules` searches
# them per model by FLD and writes its choice into the model's card (the shipped card's differ).
DEFAULT_SCHEDULES: dict[int, tuple[float, ...]] = {
    1: (T_MAX,),
    2: (T_MAX, 1.1),
    3: (T_MAX, 1.1, 0.8),
    4: (T_MAX, 1.3, 1.1, 0.8),
}


def sigma_to_t(sigma: torch.Tensor, sigma_d: float = SIGMA_D) -> torch.Tensor:
    return torch.atan(sigma / sigma_d)


def t_to_sigma(t: torch.Tensor, sigma_d: float = SIGMA_D) -> torch.Tensor:
    return sigma_d * torch.tan(t)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t: [B] (or a scalar) -> [B, 1, 1, 1] in x's dtype (time math stays fp32 until here)."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# The TrigFlow formulas, one place for the samplers, the losses and the model. t: [B] or a
# scalar tensor, x0 and z: [B, C, H, W] with z ~ N(0, I).
def noise_to(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """x_t = cos(t)·x0 + sin(t)·σ_d·z: the forward process (and the samplers' re-noising)."""
    return _bcast(torch.cos(t), x0) * x0 + _bcast(torch.sin(t), x0) * sigma_d * z


def v_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """v = dx_t/dt = cos(t)·σ_d·z − sin(t)·x0: what σ_d·F learns (the diffusion target)."""
    return _bcast(torch.cos(t), x0) * sigma_d * z - _bcast(torch.sin(t), x0) * x0


def ddim_step(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One deterministic PF-ODE step from t to s, exact for a locally constant velocity v:
    x_s = cos(t − s)·x_t − sin(t − s)·v."""
    return _bcast(torch.cos(t - s), x_t) * x_t - _bcast(torch.sin(t - s), x_t) * v


class TrigFlow(nn.Module):
    """Wraps F (a DiT) into the velocity σ_d·F and the consistency function f."""

    def __init__(self, net: nn.Module, sigma_d: float = SIGMA_D) -> None:
        super().__init__()
        self.net = net
        self.sigma_d = sigma_d
        self.compute_dtype = torch.float32
        self.guidance = 1.0  # the scale a diffusion teacher's ODE is sampled with (its card's)

    def cast_network(self, dtype: torch.dtype) -> TrigFlow:
        """Cast F's weights to `dtype` once (at load), so no forward re-casts them. Only F runs in
        `dtype`: its input is cast on the way in and its output back to x's dtype, so the
        skip path cos(t)·x_t and the samplers' state stay fp32. float8 (e4m3): F in bf16 with
        its blocks' linears in float8 (`models/fp8.py`)."""
        fp8 = dtype == torch.float8_e4m3fn
        dtype = torch.bfloat16 if fp8 else dtype
        self.net.to(dtype)
        if fp8:
            from models.fp8 import quantize_blocks

            if not quantize_blocks(self.net):
                raise ValueError("float8 serves a DiT's block linears; this network has no DiT blocks")
        pack = getattr(self.net, "pack_modulation", None)
        if pack is not None:  # after the cast, which gave every weight storage of its own
            pack()
        self.compute_dtype = dtype
        return self

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """σ_d·F(x_t/σ_d, t, y): the PF-ODE dx/dt. x_t: [B, C, H, W]; t: [B] fp32; y: [B]."""
        F = self.net((x_t / self.sigma_d).to(self.compute_dtype), t, y)
        return self.sigma_d * F.to(x_t.dtype)

    def guided_velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
        """Classifier-free guidance: v_w = v(x, t, ∅) + w·(v(x, t, y) − v(x, t, ∅)), w = 1 being
        the plain conditional velocity. One forward over 2B rows (conditional, then null). Rows
        whose label is already the null class get v(∅) for any w."""
        if w == 1.0:
            return self.velocity(x_t, t, y)
        null = torch.full_like(y, self.net.null_class)  # type: ignore[arg-type]
        v = self.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_null = v.chunk(2)
        return v_null + w * (v_cond - v_null)

    def ode_velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The velocity the served ODE sampler follows: guided at the card's scale."""
        return self.guided_velocity(x_t, t, y, self.guidance)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x_t, t, y): the consistency function, also the diffusion model's x0 estimate."""
        return _bcast(torch.cos(t), x_t) * x_t - _bcast(torch.sin(t), x_t) * self.velocity(x_t, t, y)

    # models.interface.ConsistencyModel
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(x_t, t, y)

    def start(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sin(t)·σ_d·z: the forward process from x0 = 0."""
        return noise_to(torch.zeros_like(z), z, t, self.sigma_d)

    def renoise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise_to(x0, z, t, self.sigma_d)


def validate_schedule(steps: int, times: tuple[float, ...] | list[float]) -> None:
    """A schedule is `steps` strictly descending times in (0, π/2)."""
    if len(times) != steps:
        raise ValueError(f"schedule for {steps} steps has {len(times)} times")
    for a in times:
        if not (0.0 < float(a) < math.pi / 2):
            raise ValueError(f"schedule time {a} is outside (0, pi/2)")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"schedule {list(times)} is not strictly descending")


def teacher_times(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> list[float]:
    """EDM's ρ-spaced σ grid mapped to TrigFlow time, followed by t = 0. -> steps + 1 times."""
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    sig = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [*sigma_to_t(sig).tolist(), 0.0]
