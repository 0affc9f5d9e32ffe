from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.conftest import DTYPES, LAUNCHES, assert_close_to_fp32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 16), (2, 49, 192), (3, 5, 123), (2, 3, 1023), (1, 4, 1500)], ids=str
)
def test_gated_residual_matches_reference(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(sum(shape))
    B, N, D = shape
    x, h = torch.randn(B, N, D), torch.randn(B, N, D)
    gate = torch.randn(B, 6 * D)[:, D : 2 * D]  # a strided column slice, as in the model
    ref32 = reference.gated_residual(x, gate, h)
    lp = [t.to(dtype) for t in (x, gate, h)]
    n0 = LAUNCHES["_gated_residual_kernel"]
    out = kernels.gated_residual(*lp)
    assert LAUNCHES["_gated_residual_kernel"] == n0 + 1
    assert_close_to_fp32(out, reference.gated_residual(*lp), ref32, dtype)
