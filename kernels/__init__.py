"""Fused ops of the DiT, dispatched by device.

On CUDA tensors each op runs its Triton kernel; anywhere else (and on CUDA when
`CMSERVE_KERNELS=reference` or `use_reference(True)`) it runs the torch reference in
`kernels.reference`. Tests force the Triton path on the CPU through `TRITON_INTERPRET=1` with
`force_triton(True)`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from kernels import reference

_force_reference = os.environ.get("CMSERVE_KERNELS", "auto") == "reference"
_force_triton = os.environ.get("CMSERVE_KERNELS", "auto") == "triton"


def use_reference(flag: bool) -> None:
    """Force the torch references even on CUDA (A/B comparisons)."""
    global _force_reference
    _force_reference = flag


def force_triton(flag: bool) -> None:
    """Run the Triton kernels whatever the device (the CPU needs TRITON_INTERPRET=1)."""
    global _force_triton
    _force_triton = flag


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(x: torch.Tensor, op: str = "") -> str:
    """'triton' or 'reference': which implementation `op` on `x` will run.

    fp32 attention on CUDA runs torch's: with IEEE-exact fp32 dots (no TF32) the Triton kernel
    runs on the FMA units and was 1.3-37x slower than torch's fp32 attention on an H100
    (docs/performance.md); the kernel stays the path for bf16/fp16, where it wins.
    """
    if _force_reference:
        return "reference"
    if _force_triton:
        return "triton"
    if x.is_cuda and triton_available() and not (op == "attention" and x.dtype == torch.float32):
        return "triton"
    return "reference"


def _dispatch(name: str) -> Callable[..., Any]:
    ref = getattr(reference, name)

    def op(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if backend_for(x, name) == "triton":
            from kernels import triton_ops  # imported lazily: triton is optional on the CPU

            return getattr(triton_ops, name)(x, *args, **kwargs)
        return ref(x, *args, **kwargs)

    op.__name__ = name
    op.__doc__ = ref.__doc__
    return op


adaln_norm = _dispatch("adaln_norm")
gated_residual = _dispatch("gated_residual")
attention = _dispatch("attention")
linear_gelu = _dispatch("linear_gelu")
residual_adaln_norm = _dispatch("residual_adaln_norm")
quantize_rows_fp8 = _dispatch("quantize_rows_fp8")
adaln_norm_fp8 = _dispatch("adaln_norm_fp8")
residual_adaln_norm_fp8 = _dispatch("residual_adaln_norm_fp8")

__all__ = [
    "adaln_norm",
    "adaln_norm_fp8",
    "attention",
    "backend_for",
    "force_triton",
    "gated_residual",
    "linear_gelu",
    "quantize_rows_fp8",
    "reference",
    "residual_adaln_norm",
    "residual_adaln_norm_fp8",
    "triton_available",
    "use_reference",
]
