from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.conftest import DTYPES, LAUNCHES, assert_close_to_fp32

# (B, H, N, Dh): sequence lengths 1, 49 (the model), 77, 150, 257; head dims 16..128 incl. 24, 40, 72, 80
CASES = [
    (2, 3, 1, 16),
    (2, 6, 49, 32),
    (1, 2, 77, 24),
    (1, 2, 257, 64),
    (1, 1, 33, 128),
    (2, 2, 49, 40),
    (1, 2, 20, 80),
    (1, 2, 150, 72),  # DiT-XL/2's head dim; 64-query blocks: two full and a tail of 22
    (2, 2, 128, 64),  # every block full (the kernel's unmasked EVEN path), DiT-B/2's head dim
]


def _qkv(B: int, H: int, N: int, Dh: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # strided like the model's: one [B, N, 3, H, Dh] projection permuted to 3 x [B, H, N, Dh]
    qkv = torch.randn(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qknorm", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_matches_reference(
    case: tuple[int, int, int, int], dtype: torch.dtype, qk_norm: bool
) -> None:
    torch.manual_seed(sum(case))
    q, k, v = _qkv(*case)
    Dh = case[3]
    w = (torch.rand(Dh) + 0.5, torch.rand(Dh) + 0.5) if qk_norm else (None, None)
    ref32 = reference.attention(q, k, v, *w)
    lp = [t.to(dtype) for t in (q, k, v)]
    wl = [None if t is None else t.to(dtype) for t in w]
    n0 = LAUNCHES["_attention_kernel"]
    out = kernels.attention(*lp, *wl)
    assert LAUNCHES["_attention_kernel"] == n0 + 1
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to_fp32(out, reference.attention(*lp, *wl), ref32, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 6, 49, 32), (1, 2, 150, 72), (2, 2, 128, 64)], ids=str)
def test_k_norm_as_a_score_scale_matches_reference(case: tuple[int, ...], dtype: torch.dtype) -> None:
    """k_norm='scores' (K's weight folded into q, 1/rms_k applied to the scores) is the same op."""
    torch.manual_seed(sum(case))
    q, k, v = _qkv(*case)
    # K rows of very different norms: a missing or misplaced 1/rms_k would change the softmax
    k = k * torch.linspace(0.1, 10.0, case[2])[:, None]
    w = (torch.rand(case[3]) + 0.5, torch.rand(case[3]) + 0.5)
    ref32 = reference.attention(q, k, v, *w)
    lp = [t.to(dtype) for t in (q, k, v, *w)]
    out = kernels.attention(*lp, k_norm="scores")
    assert_close_to_fp32(out, reference.attention(*lp), ref32, dtype)


@pytest.mark.parametrize("case", [(1, 2, 256, 64), (1, 1, 300, 32)], ids=str)
def test_128_by_128_blocks_match_reference(case: tuple[int, int, int, int]) -> None:
    """The blocks a large grid gets (DiT-B/2 from batch 64 up: `_blocks`), run here on a small
    one: every block full (256 tokens), and a masked tail of 44 (300)."""
    torch.manual_seed(sum(case))
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(*case))
    w = (torch.rand(case[3]) + 0.5).to(torch.bfloat16)
    ref32 = reference.attention(*(t.float() for t in (q, k, v, w, w)))
    out = kernels.attention(q, k, v, w, w, config=(128, 128, 4, 3))
    assert_close_to_fp32(out, reference.attention(q, k, v, w, w), ref32, torch.bfloat16)


def test_softmax_is_over_all_keys_including_the_tail() -> None:
    """A key in the masked tail block must count: put the only relevant value at the last row."""
    B, H, N, Dh = 1, 1, 65, 16  # 65 = one full block of 64 + a tail of 1
    q = torch.zeros(B, H, N, Dh)
    k = torch.zeros(B, H, N, Dh)
    v = torch.zeros(B, H, N, Dh)
    q[..., 0] = 10.0
    k[..., -1, 0] = 10.0  # only the last key matches
    v[..., -1, :] = 1.0
    out = kernels.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=1e-5, rtol=0)
    assert out[..., 0].min() > 0.99


def test_bad_inputs_are_refused() -> None:
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="share"):
        kernels.attention(q, q, torch.randn(1, 1, 5, 16))
    with pytest.raises(ValueError, match="both"):
        kernels.attention(q, q, q, torch.ones(16), None)
    with pytest.raises(ValueError, match="k_norm"):
        kernels.attention(q, q, q, torch.ones(16), torch.ones(16), k_norm="values")
    with pytest.raises(ValueError, match="head dim"):
        kernels.attention(*(torch.randn(1, 1, 2, 160),) * 3)


def test_default_blocks_fit_in_an_h100s_shared_memory() -> None:
    """The H100 refused fp32 (TF32) attention at head dims 72 and 128 with 128 x 64 blocks at 3
    stages: 262144 bytes asked, 232448 the limit. Every default choice now fits."""
    from kernels.attention_kernel import SMEM_LIMIT, _blocks, smem_bytes

    assert smem_bytes(128, 64, 128, 3, 4) == 262144  # Triton's own count in that report
    for itemsize in (2, 4):
        for Dh in range(1, 129):
            for N in (1, 49, 77, 256, 1024):
                for heads in (1, 12, 3072):
                    m, n, d, _, stages = _blocks(N, Dh, itemsize, heads)
                    assert smem_bytes(m, n, d, stages, itemsize) <= SMEM_LIMIT, (itemsize, Dh, N)
    # the block sweep's choices: DiT-XL/2 (head dim 72), and DiT-B/2 at batch 1 and batch 128
    assert _blocks(256, 72, 2, 32 * 16) == (64, 64, 128, 4, 3)
    assert _blocks(256, 64, 2, 1 * 12) == (64, 64, 64, 4, 3)
    assert _blocks(256, 64, 2, 128 * 12) == (128, 128, 64, 4, 3)
