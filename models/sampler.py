"""Few-step consistency sampling and the teacher's ODE sampler, as pure functions.

Nothing here draws random numbers: the caller passes the noise for every step, so a request's
images depend only on its own seeded noise, never on its batch-mates. Both functions use only
tensor ops on `times` (no `.item()`), so a CUDA graph can capture them whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.consistency import ddim_step, noise_to

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def consistency_sample(
    f: Denoiser, noise: torch.Tensor, labels: torch.Tensor, times: torch.Tensor, sigma_d: float
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1, in TrigFlow time).

    f: the consistency function f(x_t, t, y) -> x0.
    noise: [S, B, C, H, W] standard normal, one slice per step; labels: [B] int64;
    times: [S] fp32, descending, times[0] = t_max. Returns x0: [B, C, H, W].
    Step i re-noises the previous estimate to times[i]: x = cos(t)·x0 + sin(t)·σ_d·z_i
    (with x0 = 0 before the first step, so step 1 starts from pure noise).
    """
    S, B = noise.shape[:2]
    x0 = torch.zeros_like(noise[0])
    for i in range(S):
        t = times[i].expand(B)
        x = noise_to(x0, noise[i], times[i], sigma_d)
        x0 = f(x, t, labels)
    return x0


def ode_sample(
    velocity: Denoiser, noise: torch.Tensor, labels: torch.Tensor, times: torch.Tensor, sigma_d: float
) -> torch.Tensor:
    """Deterministic TrigFlow DDIM (the teacher's PF-ODE solver).

    velocity: σ_d·F(x/σ_d, t, y). noise: [B, C, H, W]; times: [K + 1] descending, ending at 0.
    Each step is exact for a locally constant F: x_s = cos(t−s)·x_t − sin(t−s)·σ_d·F(x_t, t).
    """
    B = noise.shape[0]
    x = torch.sin(times[0]) * sigma_d * noise
    for i in range(times.shape[0] - 1):
        t, s = times[i], times[i + 1]
        x = ddim_step(x, velocity(x, t.expand(B), labels), t, s)
    return x
