"""The Triton implementations, one op per module, gathered for `kernels`' dispatch."""

from kernels.adaln_norm_kernel import adaln_norm, residual_adaln_norm
from kernels.attention_kernel import attention
from kernels.gated_residual_kernel import gated_residual

__all__ = ["adaln_norm", "attention", "gated_residual", "residual_adaln_norm"]
