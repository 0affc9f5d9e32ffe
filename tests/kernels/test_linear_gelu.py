"""The MLP's first half as one op (kernels.linear_gelu): on the CPU it is exactly the layers the
DiT was trained with; its CUDA path (cuBLASLt's bias+GELU epilogue) is checked by the `cuda`
tests and `make gpu-check`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from models.config import PRESETS
from models.placeholder import random_dit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_gelu_is_the_tanh_gelu_of_the_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    fc = nn.Linear(48, 96).to(dtype)
    x = torch.randn(3, 7, 48, dtype=dtype)
    expected = nn.Sequential(fc, nn.GELU(approximate="tanh"))(x)
    out = kernels.linear_gelu(x, fc.weight, fc.bias)
    assert out.shape == (3, 7, 96) and torch.equal(out, expected)
    # the exact GELU differs: the op is not computing that one
    assert not torch.equal(out, nn.Sequential(fc, nn.GELU())(x))


def test_dit_block_output_is_its_layers_in_sequence() -> None:
    """The block's MLP through the fused op equals running its Sequential as checkpoints name it."""
    torch.manual_seed(1)
    net = random_dit("tiny").eval()
    blk = net.blocks[0]
    D = PRESETS["tiny"].width
    h = torch.randn(2, 9, D)
    with torch.no_grad():
        fused = blk.mlp[2](kernels.linear_gelu(h, blk.mlp[0].weight, blk.mlp[0].bias))
        assert torch.equal(fused, blk.mlp(h))


def test_bad_shapes_are_refused() -> None:
    from kernels.linear_gelu_epilogue import linear_gelu

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        linear_gelu(x, torch.randn(16, 9), torch.randn(16))
    with pytest.raises(ValueError, match="bias"):
        linear_gelu(x, torch.randn(16, 8), torch.randn(15))
