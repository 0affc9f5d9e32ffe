"""Per-row float8 (e4m3) quantization in one pass: q = x · (1 / s), s = max|x_row| / 448, with the
MLP's tanh GELU optionally applied first (q from gelu(x)).

x: [R, K] with a contiguous last dim, BLOCK_R whole rows per program in registers (BLOCK_K =
next power of two >= K, masked): one read of x and one write of q (a byte per value) and its
scale, where the torch reference makes five passes (abs, max, upcast, multiply, cast), each
reading or writing the whole activation, six with the GELU. The float8 linears (models/fp8.py)
quantize every input this way before their matmul; the second MLP linear's with the GELU, so
that the first one's output goes from its matmul to this kernel without a GELU pass between.

Several rows per program: with one row of DiT-B/2's 768 values a program moves 1.5 KB, too
little in flight per SM to approach the memory's rate (`bench.gpu_check` part qsweep times the
choices).

The scale and its reciprocal are IEEE-rounded divisions, as torch's (a GPU's `x / y` in Triton
is an approximate division, which moved some rows' scales by an ulp), so the kernel gives the
reference's bits. On a GPU the casts to e4m3 and bf16 are the hardware's, which round to
nearest, ties to even, as torch's casts do. Triton's CPU interpreter's do not (given 124.3, which
is 128 in e4m3, its cast gives 64; its bf16 casts truncate), so there (HW_CAST false,
`kernels.launch.interpreted`) the kernel rounds in fp32 first (`_round_to_e4m3`,
`_round_to_bf16`) and the casts then only convert values the format holds exactly. That rounding
costs a dozen integer and float operations per value: on a GPU, where the kernel should be bound
by memory, it ran the GELU form at half the plain form's rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import interpreted
from kernels.reference import E4M3_MAX, FP8_MIN_SCALE


@triton.jit
def _round_to_e4m3(v):
    # v: fp32 with |v| <= 448. The spacing of e4m3 values around v is 2^(e - 3), e = v's binary
    # exponent, or that of the smallest normal (2^-6) for the subnormals below it.
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # exact floor(log2|v|) (0 -> -127), >= -6
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): exact products
    y = tl.abs(v) * inv_step  # y < 16
    y = (y + 12582912.0) - 12582912.0  # to the nearest integer, ties to even (1.5 * 2^23 trick)
    r = y * step
    return tl.where(bits < 0, -r, r)  # v's sign, -0 included (what torch's cast keeps)


@triton.jit
def _round_to_bf16(v):
    # fp32 -> the nearest bf16 (ties to even), kept in fp32: the interpreter's cast truncates
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: the upper 16 bits set
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rounded_to(x, DTYPE: tl.constexpr, HW_CAST: tl.constexpr):
    # fp32 x rounded to DTYPE (to nearest, ties to even) and kept in fp32: what the reference
    # quantizes when its input is a DTYPE tensor
    if HW_CAST:
        r = x.to(DTYPE).to(tl.float32)
    elif tl.bfloat16 == DTYPE:
        r = _round_to_bf16(x)
    else:
        r = x.to(DTYPE).to(tl.float32)
    return r


@triton.jit
def _e4m3_ready(v, HW_CAST: tl.constexpr):
    # v (fp32, |v| <= 448) as the cast to e4m3 should take it: as is for the hardware's cast,
    # rounded first for the interpreter's
    if not HW_CAST:
        v = _round_to_e4m3(v)
    return v


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) = x · sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); -> x for large x,
    # about 0 for large negative x (the exponent capped where exp would overflow)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
    return x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))


@triton.jit
def _quantize_rows_fp8_kernel(
    X, Q, S, R, K, sx_r, sq_r, qmax, smin,
    GELU: tl.constexpr, HW_CAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # 64-bit: R*K > 2^31
    cols = tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None] * sx_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:  # rounded to x's dtype, as the reference's gelu output is
        x = _rounded_to(_gelu_tanh(x), X.dtype.element_ty, HW_CAST)
    s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), qmax), smin)  # [BLOCK_R]
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    q = _e4m3_ready(x * inv[:, None], HW_CAST)
    tl.store(Q + rows[:, None] * sq_r + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + rows, s, mask=rows < R)


def _config(K: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps): about 4,096 values per program with 4 warps, a row of 8,192 with 8:
    the qsweep part's fastest at DiT-B/2's widths and at DiT-XL/2's MLP width on an H200, as the
    kernel rounded in fp32 then (docs/performance.md)."""
    block_k = triton.next_power_of_2(K)
    block_r = min(max(4096 // block_k, 1), 16)
    return block_r, 8 if block_r * block_k > 4096 else 4


def quantize_rows_fp8(
    x: torch.Tensor, gelu: bool = False, config: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [R, K] (rows at any stride, last dim contiguous) -> (q e4m3 [R, K], scale fp32 [R, 1]),
    of gelu(x) (tanh) when `gelu`. config: (BLOCK_R, num_warps) instead of the default (benchmarks)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [R, K], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    R, K = x.shape
    block_k = triton.next_power_of_2(K)
    if block_k > 65536:
        raise ValueError(f"rows of {K} too long for a whole-row kernel")
    block_r, warps = config or _config(K)
    q = torch.empty((R, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((R, 1), dtype=torch.float32, device=x.device)
    _quantize_rows_fp8_kernel[(triton.cdiv(R, block_r),)](
        x, q, s, R, K, x.stride(0), q.stride(0), E4M3_MAX, FP8_MIN_SCALE,
        GELU=gelu, HW_CAST=not interpreted(x), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return q, s
