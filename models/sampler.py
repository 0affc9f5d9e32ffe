"""Few-step consistency sampling and the teacher's ODE sampler, as pure functions.

Nothing here draws random numbers: the caller passes the noise for every step, so a request's
images depend only on its own seeded noise, never on its batch-mates. Both functions use only
tensor ops on `times` (no `.item()`), so a CUDA graph can capture them whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.consistency import ddim_step
from models.editing import Constraint
from models.interface import ConsistencyModel

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def consistency_sample(
    model: ConsistencyModel,
    noise: torch.Tensor,
    labels: torch.Tensor,
    times: torch.Tensor,
    constraint: Constraint | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) in the model's own time, and
    with a constraint its zero-shot editing (Alg. 4).

    noise: [S, B, C, H, W] standard normal, one slice per step; labels: [B] int64;
    times: [S] fp32 descending (the model's schedule), or [S, B]: each row its own (variations).
    Returns x0: [B, C, H, W].
    Step 1 denoises `model.start(z_0, times[0])` (rows with `constraint.from_ref` start from the
    reference re-noised instead); step i > 1 denoises the previous estimate re-noised to
    times[i] with z_i (`model.renoise`: TrigFlow cos(t)·x0 + sin(t)·σ_d·z, EDM
    x0 + √(σ² − σ_min²)·z). With a constraint, every estimate is projected onto it first.
    """
    S, B = noise.shape[:2]
    x = model.start(noise[0], times[0])
    if constraint is not None:
        from_ref = constraint.from_ref.reshape(-1, *([1] * (x.dim() - 1))) > 0
        x = torch.where(from_ref, model.renoise(constraint.ref, noise[0], times[0]), x)
    x0 = model.denoise(x, times[0].expand(B), labels)
    if constraint is not None:
        x0 = constraint.project(x0)
    for i in range(1, S):
        x = model.renoise(x0, noise[i], times[i])
        x0 = model.denoise(x, times[i].expand(B), labels)
        if constraint is not None:
            x0 = constraint.project(x0)
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


# Step-level (continuous) batching: one network evaluation advances every row by one step of its
# own schedule, so rows at different steps of different schedules share it. Per row the arithmetic
# is exactly the request-level samplers' (the same ops on the same values; torch.where only
# selects), so an image does not depend on which rows it shared evaluations with.


def consistency_step(
    model: ConsistencyModel,
    x0_prev: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    first: torch.Tensor,
    labels: torch.Tensor,
    constraint: Constraint | None = None,
) -> torch.Tensor:
    """One step of `consistency_sample` for every row. x0_prev: [B, C, H, W] each row's last
    estimate (ignored on its first step); z: [B, C, H, W] its noise for this step; t: [B] its time
    for this step; first: [B] bool, its first step; constraint: the rows' edits (None: no row
    edited). -> the new estimates [B, C, H, W]."""
    shape = (-1, *([1] * (z.dim() - 1)))
    x_first = model.start(z, t)
    if constraint is not None:
        from_ref = constraint.from_ref.reshape(shape) > 0
        x_first = torch.where(from_ref, model.renoise(constraint.ref, z, t), x_first)
    x = torch.where(first.reshape(shape), x_first, model.renoise(x0_prev, z, t))
    x0 = model.denoise(x, t, labels)
    return x0 if constraint is None else constraint.project(x0)


def ode_step(
    velocity: Denoiser,
    x_prev: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    first: torch.Tensor,
    labels: torch.Tensor,
    sigma_d: float,
) -> torch.Tensor:
    """One step of `ode_sample` for every row: from its time t to its next time s ([B] each);
    a row on its first step starts from sin(t)·σ_d·z instead of x_prev. -> x at s [B, C, H, W]."""
    shape = (-1, *([1] * (z.dim() - 1)))
    x = torch.where(first.reshape(shape), (torch.sin(t) * sigma_d).reshape(shape) * z, x_prev)
    return ddim_step(x, velocity(x, t, labels), t, s)
