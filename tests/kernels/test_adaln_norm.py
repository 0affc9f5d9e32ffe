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


def _same_quantization(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    """The reference's float8 values to within one e4m3 step where a norm output landed on the
    other side of a rounding boundary (the kernel and torch sum in other orders), on few values."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-2, atol=0)
    back, ref = q.float().flatten(0, -2) * s, q_ref.float().flatten(0, -2) * s_ref
    # one e4m3 step: 1/8 of the larger of the two (a bf16 norm output on the other side of a
    # rounding boundary, and the row's scale moved by a bf16 ulp if it was the row's largest), or
    # under 2^-8 of the scale among the subnormals
    assert ((back - ref).abs() <= torch.maximum(back.abs(), ref.abs()) / 8 + s_ref * 2.0**-8).all()
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 0.05


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 49, 192), (3, 5, 123), (1, 4, 1500)], ids=str)
def test_norms_in_float8_match_the_reference(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """The float8 forms (the norm's output quantized per token in the same pass, for the float8
    linears after it): one launch each; the plain form as the reference's quantization of the
    reference's norm; the residual form as the quantization of the unfused residual form's
    output (both normalize x' before it is rounded to x's dtype, the reference after) and its x'
    the same."""
    torch.manual_seed(sum(shape) + 2)
    B, N, D = shape
    x, h = (torch.randn(B, N, D) * 3).to(dtype), torch.randn(B, N, D).to(dtype)
    gate, shift, scale = (m.to(dtype) for m in _mods(B, D, 3))
    n0 = LAUNCHES["_adaln_norm_kernel"]
    q, s = kernels.adaln_norm_fp8(x, shift, scale)
    x_new, q2, s2 = kernels.residual_adaln_norm_fp8(x, gate, h, shift, scale)
    assert LAUNCHES["_adaln_norm_kernel"] == n0 + 2
    _same_quantization(q, s, *reference.adaln_norm_fp8(x, shift, scale))
    x_unfused, y_unfused = kernels.residual_adaln_norm(x, gate, h, shift, scale)
    q_ref, s_ref = reference.quantize_rows_fp8(y_unfused.reshape(-1, D))
    _same_quantization(q2, s2, q_ref.view(B, N, D), s_ref)
    torch.testing.assert_close(x_new, x_unfused, rtol=0, atol=0)
    assert (q.float().abs().flatten(0, 1).amax(dim=1) == reference.E4M3_MAX).all()  # each token spans e4m3
