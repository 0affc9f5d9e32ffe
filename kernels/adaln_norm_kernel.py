"""Fused adaLN LayerNorm, optionally fused with the gated residual that precedes it.

Per row r of x: [B, N, D] (batch b = r // N):
    plain:     y = LN(x_r) * (1 + scale[b]) + shift[b]
    residual:  x'_r = x_r + gate[b] * h_r;  y = LN(x'_r) * (1 + scale[b]) + shift[b]; writes x' too
    float8:    y as e4m3 with the row's scale (q = y · (1 / s), s = max|y| / 448), y rounded to
               x's dtype first: `quantize_rows_fp8` of the plain form's output, in the same pass
One program per row (b, n), addressed through each tensor's (batch, token) strides so that
slices such as `big[:, :1]` are read in place, the whole row in registers (BLOCK_D = next power
of two >= D, masked), so the residual form reads x and h once and writes x' and y once instead
of a separate residual pass plus a norm pass (2 reads + 1 write saved per element). Statistics
are fp32 whatever the input dtype (Triton tutorial 05, Liger's layer_norm). The float8 form feeds
the float8 linears that follow the norms (models/fp8.py): the row is already in registers, so the
separate quantization pass (a read of y and a write of q) is saved, and y is written as one byte
per value instead of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quant_kernel import _e4m3_ready, _rounded_to
from kernels.launch import interpreted
from kernels.reference import E4M3_MAX, FP8_MIN_SCALE


@triton.jit
def _adaln_norm_kernel(
    X, H, GATE, SHIFT, SCALE, Y, YS, XOUT, N, D,
    sx_b, sx_n, sh_b, sh_n, sy_b, sy_n, sxo_b, sxo_n,  # (batch, token) strides; last dim contiguous
    stride_g, stride_sh, stride_sc,  # row strides of gate/shift/scale ([B, D] views of the adaLN output)
    eps, qmax, smin,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,  # y as e4m3 into Y, its scale into YS[row]
    HW_CAST: tl.constexpr,  # the hardware's rounding casts (not the interpreter's): fp8_quant_kernel
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
    if QUANT:
        y = tl.where(mask, _rounded_to(y, X.dtype.element_ty, HW_CAST), 0.0)
        s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=0), qmax), smin)
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        y = _e4m3_ready(y * inv, HW_CAST)
        tl.store(YS + row, s)
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


def _launch(x, h, gate, shift, scale, y, x_out, eps: float, residual: bool, ys=None) -> None:
    """One launch of the kernel for any form; h/gate/x_out are unused when not residual; ys, the
    rows' scales, makes y float8."""
    B, N, D = x.shape
    block, warps = _launch_params(D)
    _adaln_norm_kernel[(B * N,)](
        x, h, gate, shift, scale, y, y if ys is None else ys, x_out, N, D,
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), y.stride(0), y.stride(1),
        x_out.stride(0), x_out.stride(1),
        gate.stride(0), shift.stride(0), scale.stride(0), eps, E4M3_MAX, FP8_MIN_SCALE,
        HAS_RESIDUAL=residual, QUANT=ys is not None, HW_CAST=not interpreted(x), BLOCK_D=block,
        num_warps=warps,
    )  # fmt: skip


def _residual_inputs(
    x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual forms' inputs checked and read in place where they can be -> (x, h, a buffer
    for x')."""
    _check(x, gate, shift, scale)
    if h.shape != x.shape:
        raise ValueError(f"h must match x {tuple(x.shape)}, got {tuple(h.shape)}")
    x, h = _last_dim_contiguous(x), _last_dim_contiguous(h)
    return x, h, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fp8_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers of the float8 form: q e4m3 [B, N, D], scale fp32 [B·N, 1]."""
    B, N, D = x.shape
    q = torch.empty((B, N, D), dtype=torch.float8_e4m3fn, device=x.device)
    return q, torch.empty((B * N, 1), dtype=torch.float32, device=x.device)


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
    x, h, x_new = _residual_inputs(x, gate, h, shift, scale)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, h, gate, shift, scale, y, x_new, eps, residual=True)
    return x_new, y


def adaln_norm_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_fp8` of adaln_norm(x, shift, scale), in one pass. x: [B, N, D] ->
    (q e4m3 [B, N, D], scale fp32 [B·N, 1])."""
    _check(x, shift, scale)
    x = _last_dim_contiguous(x)
    q, s = _fp8_out(x)
    _launch(x, x, shift, shift, scale, q, q, eps, residual=False, ys=s)
    return q, s


def residual_adaln_norm_fp8(
    x: torch.Tensor,
    gate: torch.Tensor,
    h: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x' = x + gate[b]·h and the float8 form of adaLN(x'), in one pass. -> (x' [B, N, D],
    q e4m3 [B, N, D], scale fp32 [B·N, 1])."""
    x, h, x_new = _residual_inputs(x, gate, h, shift, scale)
    q, s = _fp8_out(x)
    _launch(x, h, gate, shift, scale, q, x_new, eps, residual=True, ys=s)
    return x_new, q, s
