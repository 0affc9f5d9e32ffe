"""The fused implementations, one op per module, gathered for `kernels`' dispatch: Triton
kernels, and one cuBLASLt epilogue (linear_gelu)."""

from kernels.adaln_norm_kernel import adaln_norm, adaln_norm_fp8, residual_adaln_norm, residual_adaln_norm_fp8
from kernels.attention_kernel import attention
from kernels.fp8_quant_kernel import quantize_rows_fp8
from kernels.gated_residual_kernel import gated_residual
from kernels.linear_gelu_epilogue import linear_gelu

__all__ = [
    "adaln_norm",
    "adaln_norm_fp8",
    "attention",
    "gated_residual",
    "linear_gelu",
    "quantize_rows_fp8",
    "residual_adaln_norm",
    "residual_adaln_norm_fp8",
]
