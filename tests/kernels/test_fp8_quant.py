from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.conftest import DTYPES, LAUNCHES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (49, 192), (7, 123), (3, 1500)], ids=str)
def test_quantize_rows_fp8_matches_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The same bits as the reference, scales and values (rounding to nearest even, ties and
    carries into the next binade included); a row of zeros gives zeros; rows read at a stride."""
    torch.manual_seed(sum(shape))
    R, K = shape
    wide = torch.randn(R, K + 8) * torch.logspace(-2, 2, R)[:, None]
    wide[0] = 0.0
    x = wide[:, 4 : 4 + K].to(dtype)  # rows at a stride of K + 8
    n0 = LAUNCHES["_quantize_rows_fp8_kernel"]
    q, s = kernels.quantize_rows_fp8(x)
    assert LAUNCHES["_quantize_rows_fp8_kernel"] == n0 + 1
    q_ref, s_ref = reference.quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (R, K) and s.shape == (R, 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    a = q.float()
    assert (a[0] == 0).all()
    assert (a.abs().amax(dim=1)[1:] == reference.E4M3_MAX).all()  # each row spans e4m3's range


def test_e4m3_rounding_ties_carries_and_subnormals() -> None:
    """Values chosen at the edges: ties between two e4m3 values (to the even one), roundings
    that carry into the next binade, subnormals, and the row's own maximum."""
    grid = [448.0, 124.0, 120.0, 116.0, 15.5, 14.5, 2.0**-7 + 2.0**-10, 2.0**-9 * 1.5, 2.0**-10, 0.0]
    x = torch.tensor([grid, [-v for v in grid]])
    q, _ = kernels.quantize_rows_fp8(x)
    q_ref, _ = reference.quantize_rows_fp8(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q.float()[0, 1] == 128.0 and q.float()[0, 3] == 112.0  # a carry up; a tie to even


@pytest.mark.parametrize("config", [(1, 4), (4, 8), (16, 2)], ids=str)
def test_every_rows_per_program_choice_gives_the_same_bits(config: tuple[int, int]) -> None:
    """Rows per program and warps (what the qsweep part times) change how the rows are split,
    never the result; 23 rows leave the last program part-filled at 4 and 16 rows."""
    from kernels.fp8_quant_kernel import quantize_rows_fp8

    torch.manual_seed(1)
    x = (torch.randn(23, 200) * torch.logspace(-1, 1, 23)[:, None]).to(torch.bfloat16)
    q, s = quantize_rows_fp8(x, config=config)
    q_ref, s_ref = reference.quantize_rows_fp8(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_then_quantize_matches_the_reference(dtype: torch.dtype) -> None:
    """gelu=True quantizes gelu(x) (tanh) as read, in one launch: the reference's scales to an
    fp32 rounding and its bytes but for rare values on an e4m3 rounding boundary (the GELU's exp
    and torch's tanh differ in the last bits), and never the bytes of x without the GELU."""
    torch.manual_seed(2)
    x = (torch.randn(37, 160) * 3).to(dtype)
    n0 = LAUNCHES["_quantize_rows_fp8_kernel"]
    q, s = kernels.quantize_rows_fp8(x, gelu=True)
    assert LAUNCHES["_quantize_rows_fp8_kernel"] == n0 + 1
    q_ref, s_ref = reference.quantize_rows_fp8(x, gelu=True)
    torch.testing.assert_close(s, s_ref, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)
    back, ref = q.float() * s, q_ref.float() * s_ref
    assert ((back - ref).abs() <= ref.abs() / 8 + s_ref * 2.0**-9).all()  # one e4m3 step at most
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 0.01
    plain, _ = reference.quantize_rows_fp8(x)
    assert (q.view(torch.uint8) != plain.view(torch.uint8)).float().mean() > 0.3
    assert (back >= -0.18).all()  # tanh GELU's minimum is about -0.17
