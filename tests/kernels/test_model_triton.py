"""A whole DiT forward with every fused op as a Triton kernel matches the torch path."""

from __future__ import annotations

import pytest
import torch

import kernels
from models.config import DiTConfig
from models.consistency import DEFAULT_SCHEDULES, TrigFlow
from models.dit import DiT
from models.sampler import consistency_sample
from tests.kernels.conftest import LAUNCHES


def _model() -> TrigFlow:
    torch.manual_seed(0)
    # the shipped model's 49 tokens and head dim 32, narrower and shallower to keep the interpreter quick
    net = DiT(DiTConfig(patch_size=4, width=64, depth=2, num_heads=2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return TrigFlow(net).eval()


@torch.no_grad()
@pytest.mark.parametrize("packed", [False, True], ids=["per-layer", "packed-modulation"])
def test_two_step_sample_with_triton_kernels_matches_torch(packed: bool) -> None:
    # packed: the norms read their shift/scale/gate as strided column slices of one matmul's out
    m = _model()
    if packed:
        m.net.pack_modulation()  # type: ignore[operator]
    noise = torch.randn(2, 3, 1, 28, 28)
    y = torch.tensor([1, 5, 10])
    times = torch.tensor(DEFAULT_SCHEDULES[2])
    n0 = sum(LAUNCHES.values())
    out = consistency_sample(m, noise, y, times)  # Triton (forced by the fixture)
    launches = sum(LAUNCHES.values()) - n0
    # 2 steps x (the first norm + depth 2 x (attention, two residual-and-norm ops)): each
    # block's last residual add runs fused with the next block's norm (or the final one)
    assert launches == 2 * (1 + 2 * 3)
    kernels.force_triton(False)
    ref = consistency_sample(m, noise, y, times)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert out.abs().max() > 0.1  # a real image-scale output, not zeros
