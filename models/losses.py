"""The training losses, as functions of the model and the batch (`models/train.py` draws the
batches and schedules; the TrigFlow formulas come from `models.consistency`)."""

from __future__ import annotations

import torch

from models.consistency import SIGMA_D, TrigFlow, noise_to, v_target


def v_loss(
    model: TrigFlow, x0: torch.Tensor, y: torch.Tensor, z: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """TrigFlow diffusion loss ‖F(x_t/σ_d, t) − v/σ_d‖² (sCM §2). x0, z: [B, C, H, W]; y, t: [B]."""
    x_t = noise_to(x0, z, t, SIGMA_D)
    return (model.net(x_t / SIGMA_D, t, y) - v_target(x0, z, t, SIGMA_D) / SIGMA_D).pow(2).mean()


def consistency_loss(
    model: TrigFlow, x_t: torch.Tensor, t: torch.Tensor, x_r: torch.Tensor, r: torch.Tensor, y: torch.Tensor,
    huber_c: float,
) -> torch.Tensor:  # fmt: skip
    """d(f(x_t, t), sg f(x_r, r)) / (σ_t − σ_r), with d the pseudo-Huber distance and σ = σ_d·tan t
    (the weight in σ, not in t: 1/(t − r) blew up near t_max). The target is the same network
    under no_grad; f(x, 0) = x exactly, so r = 0 is plain denoising. ECT and CD differ only in
    where x_r comes from: the same noise at r, or a step of a teacher's ODE."""
    pred = model(x_t, t, y)
    with torch.no_grad():
        target = model(x_r, r, y)
    d = (pred - target).pow(2).flatten(1).sum(1)
    dist = torch.sqrt(d + huber_c**2) - huber_c
    sigma, sigma_r = SIGMA_D * torch.tan(t), SIGMA_D * torch.tan(r)
    return (dist / (sigma - sigma_r)).mean()
