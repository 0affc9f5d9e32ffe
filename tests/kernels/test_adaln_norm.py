from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.conftest import DTYPES, LAUNCHES, assert_close_to_fp32

SHAPES = [(1, 1, 16), (2, 49, 192), (3, 5, 123), (2, 3, 1023), (1, 4, 1500), (2, 7, 256)]


def _mods(B: int, D: int, k: int) -> list[torch.Tensor]:
    # like the model: [B, D] column slices of one [B, k*D] projection (row stride k*D)
    proj = torch.randn(B, k * D) * 0.5
    return list(proj.chunk(k, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adaln_norm_matches_reference(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(sum(shape))
    B, N, D = shape
    x = torch.randn(B, N, D) * 3 + 1
    shift, scale = _mods(B, D, 2)
    ref32 = reference.adaln_norm(x, shift, scale)
    lp = [t.to(dtype) for t in (x, shift, scale)]
    n0 = LAUNCHES["_adaln_norm_kernel"]
    out = kernels.adaln_norm(*lp)
    assert LAUNCHES["_adaln_norm_kernel"] == n0 + 1
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_fp32(out, reference.adaln_norm(*lp), ref32, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_adaln_norm_matches_reference(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(sum(shape) + 1)
    B, N, D = shape
    x, h = torch.randn(B, N, D), torch.randn(B, N, D)
    gate, shift, scale = _mods(B, D, 3)
    ref_x, ref_y = reference.residual_adaln_norm(x, gate, h, shift, scale)
    lp = [t.to(dtype) for t in (x, gate, h, shift, scale)]
    out_x, out_y = kernels.residual_adaln_norm(*lp)
    t_x, t_y = reference.residual_adaln_norm(*lp)
    assert_close_to_fp32(out_x, t_x, ref_x, dtype)
    assert_close_to_fp32(out_y, t_y, ref_y, dtype)


def test_out_buffer_is_reused() -> None:
    x = torch.randn(2, 9, 123)
    shift, scale = _mods(2, 123, 2)
    buf = torch.empty_like(x)
    out = kernels.adaln_norm(x, shift, scale, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, reference.adaln_norm(x, shift, scale), atol=2e-5, rtol=0)


def test_bad_shapes_are_refused() -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        kernels.adaln_norm(x, torch.randn(3, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        kernels.adaln_norm(torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8))
