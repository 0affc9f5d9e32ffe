"""Where a launch runs, for the choices the kernels' wrappers make by it."""

from __future__ import annotations

import os

import torch


def interpreted(t: torch.Tensor) -> bool:
    """Whether a kernel launched on `t` runs in Triton's CPU interpreter (a CPU tensor, or
    TRITON_INTERPRET=1), where some ops differ from a GPU's: its bf16 dots are wrong (numpy has
    no bf16) and its casts to bf16 and e4m3 do not round to nearest."""
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
