"""Torch references for every fused op.

These are the CPU path of the model, the ground truth of the kernel tests and the baseline of
the kernel benchmarks. Statistics are computed in fp32 whatever the input dtype, like the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out=` as the Triton ops take it: the result written into a caller's buffer."""
    return y if out is None else out.copy_(y)


def adaln_norm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale[b]) + shift[b]   (DiT's `modulate(norm(x), shift, scale)`).

    x: [B, N, D]; shift, scale: [B, D]. No learned affine: adaLN supplies it.
    """
    xf = x.float()
    y = F.layer_norm(xf, (x.shape[-1],), eps=eps)
    y = y * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return _into(y.to(x.dtype), out)


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x + gate[b] * h   (adaLN-Zero's gated residual). x, h: [B, N, D]; gate: [B, D]."""
    return _into((x.float() + gate.float()[:, None, :] * h.float()).to(x.dtype), out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 (the QK-norm of the attention). x: [..., Dh]; weight: [Dh]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal softmax(QK^T / sqrt(Dh)) V with optional QK-RMSNorm.

    q, k, v: [B, H, N, Dh] -> [B, H, N, Dh].
    """
    if q_weight is not None:
        q = rms_norm(q, q_weight, eps)
    if k_weight is not None:
        k = rms_norm(k, k_weight, eps)
    return _into(F.scaled_dot_product_attention(q, k, v), out)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) of x @ weight^T + bias: the DiT MLP's first half. x: [..., K] -> [..., N]."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def residual_adaln_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    h: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x' = x + gate[b]·h, adaln_norm(x', shift, scale)): a residual and the next norm."""
    x_new = gated_residual(x, gate, h)
    return x_new, adaln_norm(x_new, shift, scale, eps)


E4M3_MAX = 448.0  # the largest finite float8 e4m3 value
FP8_MIN_SCALE = 1e-12  # a zero row's scale: its values quantize to 0 instead of 0/0


def quantize_rows_fp8(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8 quantization, x ≈ q · scale: x [R, K] -> (q e4m3 [R, K], scale fp32 [R, 1]),
    each row's scale its absolute max over E4M3_MAX, so that the row spans e4m3's range; of
    gelu(x) (tanh, in x's dtype) when `gelu`. Values are multiplied by the scale's reciprocal (one
    division per row, not per value)."""
    if gelu:
        x = F.gelu(x, approximate="tanh")
    s = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=FP8_MIN_SCALE)
    return (x.float() * (1.0 / s)).to(torch.float8_e4m3fn), s


def adaln_norm_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_fp8 of adaln_norm's output (in x's dtype), per token. x: [B, N, D] ->
    (q e4m3 [B, N, D], scale fp32 [B·N, 1]): what the float8 linear after a norm takes."""
    q, s = quantize_rows_fp8(adaln_norm(x, shift, scale, eps).reshape(-1, x.shape[-1]))
    return q.view(x.shape), s


def residual_adaln_norm_fp8(
    x: torch.Tensor,
    gate: torch.Tensor,
    h: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x' = x + gate[b]·h, adaln_norm_fp8(x', shift, scale))."""
    x_new = gated_residual(x, gate, h)
    return (x_new, *adaln_norm_fp8(x_new, shift, scale, eps))
