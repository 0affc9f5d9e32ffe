"""Per-row float8 (e4m3) quantization in one pass: q = x / s, s = max|x_row| / 448.

x: [R, K] with a contiguous last dim, one program per row, the whole row in registers (BLOCK_K =
next power of two >= K, masked): one read of x and one write of q (a byte per value) and its
scale, where the torch reference makes five passes (abs, max, upcast, divide, cast), each
reading or writing the whole activation. The float8 linears (models/fp8.py) quantize every
input this way before their matmul.

The rounding to e4m3 (3 mantissa bits, to nearest, ties to even, as torch's cast) is done in
fp32 before the cast, which then only converts values e4m3 holds exactly: so the result is the
same bits as the reference's wherever the kernel runs. (Given a value that rounds up into the
next binade, such as 124.3, which is 128 in e4m3, Triton's CPU interpreter's cast gives 64.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import E4M3_MAX, FP8_MIN_SCALE


@triton.jit
def _round_to_e4m3(v):
    # v: fp32 with |v| <= 448. The spacing of e4m3 values around v is 2^(e - 3), e = v's binary
    # exponent, or that of the smallest normal (2^-6) for the subnormals below it.
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # exact floor(log2|v|) (0 -> -127)
    step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # a power of two
    y = tl.abs(v) / step  # exact; y < 16
    y = (y + 12582912.0) - 12582912.0  # to the nearest integer, ties to even (1.5 * 2^23 trick)
    r = y * step
    return tl.where(bits < 0, -r, r)  # v's sign, -0 included (what torch's cast keeps)


@triton.jit
def _quantize_rows_fp8_kernel(X, Q, S, K, sx_r, sq_r, qmax, smin, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: R*K can pass 2^31
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(X + row * sx_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0) / qmax, smin)
    tl.store(Q + row * sq_r + cols, _round_to_e4m3(x / s).to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, s)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [R, K] (rows at any stride, last dim contiguous) -> (q e4m3 [R, K], scale fp32 [R, 1])."""
    if x.dim() != 2:
        raise ValueError(f"x must be [R, K], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    R, K = x.shape
    block = triton.next_power_of_2(K)
    if block > 65536:
        raise ValueError(f"rows of {K} too long for a one-row-per-program kernel")
    q = torch.empty((R, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((R, 1), dtype=torch.float32, device=x.device)
    _quantize_rows_fp8_kernel[(R,)](
        x, q, s, K, x.stride(0), q.stride(0), E4M3_MAX, FP8_MIN_SCALE,
        BLOCK_K=block, num_warps=min(max(block // 256, 1), 16),
    )  # fmt: skip
    return q, s
