"""What the server needs from any consistency model, whatever its family and network.

A family (TrigFlow: `models/consistency.py`; EDM: `models/edm.py`) wraps a network into a
`ConsistencyModel`; its loader describes it with a `ModelInfo`. The sampler, the runner (buffers,
buckets, CUDA graphs), the engine and the API use only these two, so a new family is a wrapper
and a loader (docs/model-families.md).

Times are in the family's own variable (TrigFlow time t in (0, π/2), or EDM's σ): the runner
stores a schedule as numbers and hands them back to the model, never interpreting them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from models.grid import to_uint8

FAMILIES = ("trigflow", "edm", "latent")
KINDS = ("consistency", "diffusion")


class ConsistencyModel(Protocol):
    """The network under its parametrization. x: [B, C, H, W] fp32; t: [B] fp32 (per row, so
    rows of one batch may sit at different times); labels: [B] int64; a scalar time is a 0-d
    fp32 tensor. No method may read a tensor's value on the host (`.item()`, `if t > 0`): the
    runner captures them into CUDA graphs."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """f(x_t, t, y) -> x0: the consistency function."""
        ...

    def start(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The first step's input from standard normal z at the schedule's first time."""
        ...

    def renoise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Multistep sampling's re-noising of an estimate x0 to time t with fresh noise z."""
        ...

    def cast_network(self, dtype: torch.dtype) -> Any:
        """Cast the network's weights to `dtype` once; inputs and outputs stay fp32. float8 (e4m3,
        `--dtype float8`) asks for the family's float8 path; ValueError where it has none."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """What a served model is, as the runner and the API see it."""

    name: str
    family: str  # one of FAMILIES
    kind: str  # "consistency" (few-step) or "diffusion" (a teacher, sampled with its ODE)
    channels: int
    image_size: int
    class_names: tuple[str, ...]  # () = an unconditional network
    schedules: dict[int, tuple[float, ...]]  # step count -> times, in the family's time variable
    value_range: tuple[float, float] = (-0.5, 0.5)  # data values that map to pixel 0 and 255
    null_label: int | None = None  # the label meaning "no class" (None: a request must name one)
    default_steps: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    time_name: str = "t"  # what the schedules' numbers are: "t" (TrigFlow) or "sigma" (EDM)
    sigma_data: float = 0.5  # the data's standard deviation the parametrization assumes
    conditioning_text: bool = False  # conditioned on a prompt (labels are rows of its text table)
    latent_shape: tuple[int, int, int] | None = None  # sampled in a latent space of this shape

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def conditioning(self) -> str:
        return "text" if self.conditioning_text else ("class" if self.class_names else "none")

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of what the sampler draws: the latent, or the image itself."""
        return self.latent_shape or (self.channels, self.image_size, self.image_size)

    @property
    def unconditional_ok(self) -> bool:
        """Whether a request may leave `class_label` out."""
        return self.conditioning_text or not self.class_names or self.null_label is not None

    @property
    def pad_label(self) -> int:
        """The label written into padding rows (any valid one: rows are independent)."""
        return self.null_label if self.null_label is not None else 0

    @property
    def steps(self) -> list[int]:
        return sorted(self.schedules)

    @property
    def steps_default(self) -> int:
        """The model's own default, else 2 where supported (the few-step sweet spot), else the
        fewest it supports (a teacher: its one ODE step count)."""
        if self.default_steps is not None:
            return self.default_steps
        return 2 if 2 in self.schedules else min(self.schedules)

    def to_uint8(self, x: torch.Tensor) -> np.ndarray:
        """x: [B, C, H, W] in `value_range` -> uint8 [B, H, W, C] (rounded, clipped)."""
        return to_uint8(x, self.value_range)
