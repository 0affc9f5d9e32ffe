"""Every kernel on sliced and non-contiguous inputs, read in place: a token slice with N = 1
(`big[:, :1]`, whose row stride is not D), a middle token slice, and a batch-major view of a
token-major buffer. Each result must equal the op on contiguous copies of the same values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kernels
from kernels import reference

B, NB, D = 3, 6, 40


def _views() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "first_token": lambda big: big[:, :1],  # [B, 1, D], stride(0) = NB*D
        "middle_tokens": lambda big: big[:, 2:5],  # [B, 3, D]
        "token_major": lambda big: big.transpose(0, 1).contiguous().transpose(0, 1),  # strides (D, B*D, 1)
    }


@pytest.mark.parametrize("view", list(_views()))
def test_norms_and_residual_read_views_in_place(view: str) -> None:
    torch.manual_seed(0)
    cut = _views()[view]
    x, h = cut(torch.randn(B, NB, D)), cut(torch.randn(B, NB, D))
    assert not x.is_contiguous()
    gate, shift, scale = torch.randn(B, 3 * D).chunk(3, dim=-1)
    xc, hc = x.contiguous(), h.contiguous()
    torch.testing.assert_close(kernels.adaln_norm(x, shift, scale), reference.adaln_norm(xc, shift, scale))
    got = kernels.residual_adaln_norm(x, gate, h, shift, scale)
    want = reference.residual_adaln_norm(xc, gate, hc, shift, scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kernels.gated_residual(x, gate, h), reference.gated_residual(xc, gate, hc))


@pytest.mark.parametrize("view", list(_views()))
def test_attention_reads_views_in_place(view: str) -> None:
    torch.manual_seed(1)
    cut = _views()[view]
    H, Dh = 2, 16
    q, k, v = (cut(torch.randn(B, NB, H * Dh)).unflatten(-1, (H, Dh)).transpose(1, 2) for _ in range(3))
    w = torch.rand(Dh) + 0.5
    got = kernels.attention(q, k, v, w, w)
    want = reference.attention(q.contiguous(), k.contiguous(), v.contiguous(), w, w)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["adaln_norm", "gated_residual", "attention"])
def test_out_is_accepted_by_kernel_and_reference_alike(op: str) -> None:
    """`out=` everywhere: the Triton op, the reference and the dispatcher write into it."""
    torch.manual_seed(2)
    x, h = torch.randn(B, NB, D), torch.randn(B, NB, D)
    shift, scale = torch.randn(B, 2 * D).chunk(2, dim=-1)
    q = torch.randn(B, 2, NB, 16)
    args = {"adaln_norm": (x, shift, scale), "gated_residual": (x, shift, h), "attention": (q, q, q)}[op]
    results = []
    for force in (True, False):  # the Triton kernel, then the reference (CPU tensors)
        kernels.force_triton(force)
        buf = torch.full_like(args[0], float("nan"))
        out = getattr(kernels, op)(*args, out=buf)
        assert out.data_ptr() == buf.data_ptr() and torch.isfinite(buf).all()
        results.append(buf)
    torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=1e-5)
