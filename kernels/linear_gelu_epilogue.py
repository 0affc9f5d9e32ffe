"""GELU(x @ Wᵀ + b) (tanh form) as one cuBLASLt matmul: the bias add and the GELU run in the
matmul's epilogue (CUBLASLT_EPILOGUE_GELU_BIAS, through `torch._addmm_activation`), on the fp32
accumulator before the one rounding to the output dtype.

Why: the DiT's MLP widens to 4·D, so an unfused GELU reads and writes the widest activation of
the block ([B·N, 4·D]) once more: for DiT-B/2 at batch 256 in bf16, 0.8 GB per block per step
of pure memory traffic. The epilogue is cuBLASLt's own; there is no Triton kernel here.

CUDA only: torch's CPU `_addmm_activation` applies the exact (erf) GELU, not the tanh form the
DiT was trained with, so elsewhere this is the reference's two ops.
"""

from __future__ import annotations

import torch

from kernels import reference


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: [..., K]; weight: [N, K]; bias: [N] -> [..., N]."""
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or bias.shape != (weight.shape[0],):
        raise ValueError(f"need weight [N, {K}] and bias [N]; got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if not x.is_cuda:
        return reference.linear_gelu(x, weight, bias)
    y = torch._addmm_activation(bias, x.reshape(-1, K), weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], weight.shape[0])
