"""Fused gated residual: out = x + gate[b] * h  (adaLN-Zero), one read of x and h, one write.

x, h: [B, N, D]; gate: [B, D]. 2-D grid: (rows, column blocks), computed in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_residual_kernel(
    X, GATE, H, OUT, N, D, stride_x, stride_h, stride_o, stride_g, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    b = row // N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (x + g * h).to(OUT.dtype.element_ty), mask=mask)


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if x.dim() != 3 or h.shape != x.shape or gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"need x, h: [B, N, D] and gate: [B, D]; got {tuple(x.shape)}, {tuple(h.shape)}, "
            f"{tuple(gate.shape)}"
        )
    x, h = x.contiguous(), h.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    B, N, D = x.shape
    o = out if out is not None else torch.empty_like(x)
    block = min(triton.next_power_of_2(D), 1024)
    _gated_residual_kernel[(B * N, triton.cdiv(D, block))](
        x,
        gate,
        h,
        o,
        N,
        D,
        x.stride(1),
        h.stride(1),
        o.stride(1),
        gate.stride(0),
        BLOCK_D=block,
        num_warps=4 if block >= 512 else 2,
    )
    return o
