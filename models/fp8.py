"""float8 (e4m3) serving of the DiT's block linears: weights stored in fp8 with one scale per
output channel, activations quantized per token as they arrive, one scaled matmul
(`torch._scaled_mm`, bf16 out, bias in its epilogue).

Which layers: every block's qkv, attention output, and MLP projections, which hold nearly all of
the network's FLOPs. The patch embedding, the time/label MLPs, the adaLN projections (they set
every block's shift, scale and gate) and the output layer stay in bf16, as do the norms and the
attention itself.

Scales: a weight row's scale is its absolute max over 448 (e4m3's largest finite value), so the
row uses the format's whole range; an activation row's (one token's) likewise, computed at each
call. Per-channel and per-token scales keep one outlier from flattening the rest of its tensor.
Where an activation comes from: qkv's and the first MLP linear's from the adaLN norm before them,
which writes them in e4m3 with their scales in the pass that normalizes each row
(`kernels.adaln_norm_fp8`, `residual_adaln_norm_fp8`; handed on as `Quantized`); the attention
output's and the MLP's GELU input from a quantization pass of their own
(`kernels.quantize_rows_fp8`, which applies the GELU for the second MLP linear).

Runs where torch has float8 matmuls with per-row scales: on CUDA GPUs of compute capability 9.0
and up (Hopper; Ada has float8 tensor cores, but torch's row-scaled float8 matmul targets sm90),
and on the CPU (slowly; for checking what fp8 does to quality).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import kernels
from kernels.reference import quantize_rows_fp8

E4M3 = torch.float8_e4m3fn


def supported(device: torch.device) -> bool:
    """Whether float8 serving runs on `device`: the CPU, or a CUDA GPU of compute capability 9.0
    and up (the module docstring)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


class Quantized(NamedTuple):
    """An activation already in e4m3, as a norm's float8 form hands it to the linear after it
    (`kernels.adaln_norm_fp8`): q [..., K] e4m3, scale fp32 [R, 1] for each of q's R rows of K."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def takes_float8(layer: nn.Module) -> bool:
    """Whether `layer` takes its input as `Quantized` (a float8 linear without a GELU before it)."""
    return isinstance(layer, Fp8Linear) and not layer.gelu


class Fp8Linear(nn.Module):
    """An nn.Linear's y = x Wᵀ + b with W in e4m3 (per output channel scales) and x quantized to
    e4m3 per row at each call; y = gelu(x) Wᵀ + b with `gelu`, the GELU (tanh) applied by the
    quantization kernel as it reads x. x: [..., K] bf16, or `Quantized` (then already in e4m3,
    and no GELU) -> [..., N] bf16."""

    weight: torch.Tensor  # [N, K] e4m3
    weight_scale: torch.Tensor  # [1, N] fp32: output channel n's scale
    bias: torch.Tensor | None  # [N] bf16

    def __init__(self, linear: nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        N, K = linear.weight.shape
        if K % 16 or N % 16:  # what float8 matmuls take on a GPU
            raise ValueError(f"a float8 linear needs both dims multiples of 16; got [{N}, {K}]")
        q, s = quantize_rows_fp8(linear.weight.detach())  # once, at load: the reference will do
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", s.reshape(1, N).contiguous())
        b = linear.bias
        self.register_buffer("bias", None if b is None else b.detach().to(torch.bfloat16))
        self.in_features, self.out_features, self.gelu = K, N, gelu

    def forward(self, x: torch.Tensor | Quantized) -> torch.Tensor:
        K = self.in_features
        if isinstance(x, Quantized):
            if self.gelu:
                raise ValueError("a float8 linear with a GELU before it takes its input unquantized")
            xq, s = x.q.reshape(-1, K), x.scale
        else:
            xq, s = kernels.quantize_rows_fp8(x.reshape(-1, K), gelu=self.gelu)
        # mat2 column-major, as the fp8 matmul requires: the transpose of the row-major weight
        w, ws = self.weight.t(), self.weight_scale
        y = torch._scaled_mm(xq, w, scale_a=s, scale_b=ws, bias=self.bias, out_dtype=torch.bfloat16)
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Linear:
        # `.to(dtype)` casts every floating buffer, e4m3 ones included, which would leave scaled
        # values multiplied as if unscaled: a move is fine, a cast is an error
        moved = super()._apply(fn, recurse)
        if self.weight.dtype != E4M3 or self.weight_scale.dtype != torch.float32:
            raise TypeError("a float8 linear was cast; only move it (.to(device))")
        return moved


def quantize_blocks(net: nn.Module) -> int:
    """Replace the linears of every block of a DiT (`models.dit.Block`: attn.qkv, attn.proj,
    mlp[0], mlp[2]) with Fp8Linear, in place; mlp[2] applies the MLP's GELU to its input, so the
    block runs mlp[2](mlp[0](h)). -> how many were replaced."""
    from models.dit import Block

    n = 0
    for blk in net.modules():
        if not isinstance(blk, Block):
            continue
        linears = ((blk.attn, "qkv", False), (blk.attn, "proj", False), (blk.mlp, "0", False),
                   (blk.mlp, "2", True))  # fmt: skip
        for parent, name, gelu in linears:
            lin = getattr(parent, name)
            if isinstance(lin, nn.Linear):
                setattr(parent, name, Fp8Linear(lin, gelu=gelu))
                n += 1
    return n
