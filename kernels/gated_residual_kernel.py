"""Fused gated residual: out = x + gate[b] * h  (adaLN-Zero), one read of x and h, one write.

x, h: [B, N, D], addressed through their (batch, token) strides; gate: [B, D]. 2-D grid: (rows,
column blocks), computed in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_residual_kernel(
    X, GATE, H, OUT, N, D, sx_b, sx_n, sh_b, sh_n, so_b, so_n, stride_g, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    b = (row // N).to(tl.int64)  # 64-bit offsets: B*N*D can pass 2^31
    n = (row % N).to(tl.int64)
    x = tl.load(X + b * sx_b + n * sx_n + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + b * sh_b + n * sh_n + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * so_b + n * so_n + cols, (x + g * h).to(OUT.dtype.element_ty), mask=mask)


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x, h: [B, N, D] (any batch/token strides); gate: [B, D] -> x + gate[b]·h."""
    if x.dim() != 3 or h.shape != x.shape or gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"need x, h: [B, N, D] and gate: [B, D]; got {tuple(x.shape)}, {tuple(h.shape)}, "
            f"{tuple(gate.shape)}"
        )
    x, h = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, h))
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    B, N, D = x.shape
    o = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if o.shape != x.shape or o.dtype != x.dtype or o.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype} with a contiguous last dim")
    block = min(triton.next_power_of_2(D), 1024)
    _gated_residual_kernel[(B * N, triton.cdiv(D, block))](
        x, gate, h, o, N, D, x.stride(0), x.stride(1), h.stride(0), h.stride(1), o.stride(0), o.stride(1),
        gate.stride(0), BLOCK_D=block, num_warps=4 if block >= 512 else 2,
    )  # fmt: skip
    return o
