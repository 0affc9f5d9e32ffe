"""Fused adaLN LayerNorm, optionally fused with the gated residual that precedes it.

Per row r of x: [B, N, D] (batch b = r // N):
    plain:     y = LN(x_r) * (1 + scale[b]) + shift[b]
    residual:  x'_r = x_r + gate[b] * h_r;  y = LN(x'_r) * (1 + scale[b]) + shift[b]; writes x' too
One program per row (b, n), addressed through each tensor's (batch, token) strides so that
slices such as `big[:, :1]` are read in place, the whole row in registers (BLOCK_D = next power
of two >= D, masked), so the residual form reads x and h once and writes x' and y once instead
of a separate residual pass plus a norm pass (2 reads + 1 write saved per element). Statistics
are fp32 whatever the input dtype (Triton tutorial 05, Liger's layer_norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adaln_norm_kernel(
    X, H, GATE, SHIFT, SCALE, Y, XOUT, N, D,
    sx_b, sx_n, sh_b, sh_n, sy_b, sy_n, sxo_b, sxo_n,  # (batch, token) strides; last dim contiguous
    stride_g, stride_sh, stride_sc,  # row strides of gate/shift/scale ([B, D] views of the adaLN output)
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    # 64-bit offsets: B*N*D can pass 2^31 for large batches of large models
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + b * sx_b + n * sx_n + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = tl.load(H + b * sh_b + n * sh_n + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GATE + b * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + g * h
        tl.store(XOUT + b * sxo_b + n * sxo_n + cols, x.to(XOUT.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(SHIFT + b * stride_sh + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_sc + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(Y + b * sy_b + n * sy_n + cols, y.to(Y.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, *mods: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    B, _, D = x.shape
    for m in mods:
        if m.shape != (B, D):
            raise ValueError(f"modulation must be [B, D] = {(B, D)}, got {tuple(m.shape)}")
        if m.stride(-1) != 1:
            raise ValueError("modulation tensors need a contiguous last dim")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {x.dtype}")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype} with a contiguous last dim")


def _launch_params(D: int) -> tuple[int, int]:
    """The whole row lives in registers: up to 64K elements, more warps for wider rows."""
    block = triton.next_power_of_2(D)
    if block > 65536:
        raise ValueError(f"width {D} too large for a one-row-per-program norm")
    return block, min(max(block // 256, 1), 16)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """[B, N, D] views of any (batch, token) strides are read in place; only a strided last dim
    is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, h, gate, shift, scale, y, x_out, eps: float, residual: bool) -> None:
    """One launch of the kernel for either form; h/gate/x_out are unused when not residual."""
    B, N, D = x.shape
    block, warps = _launch_params(D)
    _adaln_norm_kernel[(B * N,)](
        x, h, gate, shift, scale, y, x_out, N, D,
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), y.stride(0), y.stride(1),
        x_out.stride(0), x_out.stride(1),
        gate.stride(0), shift.stride(0), scale.stride(0), eps,
        HAS_RESIDUAL=residual, BLOCK_D=block, num_warps=warps,
    )  # fmt: skip


def adaln_norm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [B, N, D]; shift, scale: [B, D] -> y: [B, N, D] (out= reuses a buffer, e.g. in a CUDA graph)."""
    _check(x, shift, scale)
    x = _last_dim_contiguous(x)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_out(y, x)
    _launch(x, x, shift, shift, scale, y, y, eps, residual=False)
    return y


def residual_adaln_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    h: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = x + gate[b]·h and y = adaLN(x'), in one pass. -> (x', y), both [B, N, D]."""
    _check(x, gate, shift, scale)
    if h.shape != x.shape:
        raise ValueError(f"h must match x {tuple(x.shape)}, got {tuple(h.shape)}")
    x, h = _last_dim_contiguous(x), _last_dim_contiguous(h)
    x_new = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, h, gate, shift, scale, y, x_new, eps, residual=True)
    return x_new, y
