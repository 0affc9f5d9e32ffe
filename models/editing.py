"""Zero-shot editing with the multistep consistency sampler (Song et al. 2023, Alg. 4).

After every denoise the known part of a reference image y is put back,
    x0 ← A⁻¹[(A y)⊙(1 − Ω) + (A x0)⊙Ω],
then the estimate is re-noised to the next time as in plain sampling. Two constraints, both
orthogonal projections, so the update is x0 ← x0 − P(x0 − y):
- inpainting: A = I, P keeps the known pixels (`keep` = 1 there);
- super-resolution: A = an orthogonal transform of each p×p patch whose first basis vector is
  the patch mean; keeping that coefficient of y means P(d) = the patch mean of d, spread back
  over the patch (so the output's patch means are the input's);
- colorization (colour models): A = an orthogonal transform of each pixel's channels whose first
  basis vector is the luma direction u ∝ (0.299, 0.587, 0.114); P(d) = ⟨d, u⟩·u keeps the
  input's luma and generates the chroma.
Variation (SDEdit) needs no constraint: the row starts from y re-noised to an intermediate time
instead of pure noise. Interpolation needs none either: its rows' noise is a slerp of two seeds'.

Every row carries its own constraint as data (`Constraint`), so edit rows and plain generation
rows share one batch and one CUDA graph; for a plain row every term is an exact identity
(lerp with weight 0, minus 0·d), so its output is bit-for-bit what plain sampling gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.interface import ModelInfo

SUPERRES_PATCHES = (2, 4, 7, 8, 14, 16, 32)  # p×p patch sizes offered where they divide the image
_BT601 = torch.tensor([0.299, 0.587, 0.114])
LUMA = _BT601 / _BT601.norm()  # the unit luma direction in RGB


def patch_sizes(image_size: int) -> tuple[int, ...]:
    """The super-resolution factors a model of this size supports (p < size, p | size)."""
    return tuple(p for p in SUPERRES_PATCHES if p < image_size and image_size % p == 0)


@dataclass
class Constraint:
    """Per-row edit data, all [B, ...] on the sampler's device.

    ref: [B, C, H, W] the reference y in the model's data range (zeros where unused);
    keep: [B, C, H, W] 1 where y's pixel is kept (inpainting), else 0;
    patch: [B, P] 1 in column j where the row keeps y's patch means at `patches[j]`;
    from_ref: [B] 1 where the row starts from y re-noised (variation), 0 from pure noise;
    luma: [B] 1 where the row keeps y's luma (colorization; 3-channel models only).
    """

    ref: torch.Tensor
    keep: torch.Tensor
    patch: torch.Tensor
    from_ref: torch.Tensor
    luma: torch.Tensor
    patches: tuple[int, ...]

    FIELDS = ("ref", "keep", "patch", "from_ref", "luma")  # the per-row buffers, in this order

    def buffers(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in self.FIELDS]

    def rows(self, s: slice) -> Constraint:
        """Rows `s` of every buffer (views)."""
        return Constraint(
            self.ref[s], self.keep[s], self.patch[s], self.from_ref[s], self.luma[s], self.patches
        )

    @classmethod
    def empty(cls, batch: int, shape: tuple[int, int, int], device: torch.device | str = "cpu") -> Constraint:
        """No row constrained: plain generation."""
        return cls(
            ref=torch.zeros((batch, *shape), device=device),
            keep=torch.zeros((batch, *shape), device=device),
            patch=torch.zeros((batch, len(patch_sizes(shape[-1]))), device=device),
            from_ref=torch.zeros((batch,), device=device),
            luma=torch.zeros((batch,), device=device),
            patches=patch_sizes(shape[-1]),
        )

    def project(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 ← x0 − P(x0 − y) for each row's P (identity rows untouched). x0: [B, C, H, W]."""
        d = x0 - self.ref
        out = torch.lerp(x0, self.ref, self.keep)  # exact at keep = 0 and keep = 1
        for j, p in enumerate(self.patches):
            mean = F.avg_pool2d(d, p).repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
            out = out - self.patch[:, j].reshape(-1, 1, 1, 1) * mean
        if x0.shape[1] == 3:
            # built on the device from Python floats: LUMA.to(device) would be a host-to-device
            # copy, which CUDA graph capture refuses
            u = torch.stack([x0.new_full((), c) for c in LUMA.tolist()]).reshape(1, 3, 1, 1)
            out = out - self.luma.reshape(-1, 1, 1, 1) * (d * u).sum(1, keepdim=True) * u
        return out


def strength_times(info: ModelInfo, steps: int, strength: float) -> tuple[float, ...]:
    """A variation's times: the model's `steps` schedule scaled to start at noise angle
    strength·π/2 (TrigFlow time; for σ-time models the angle of σ/σ_d), never above the
    schedule's own start. Strength 1 ≈ a fresh sample; 0.3 keeps most of the input."""
    sched = info.schedules[steps]
    sd = info.sigma_data
    angles = [math.atan(s / sd) for s in sched] if info.time_name == "sigma" else list(sched)
    a0 = min(strength * math.pi / 2, angles[0])
    scaled = [a * a0 / angles[0] for a in angles]
    if info.time_name == "sigma":
        return tuple(sd * math.tan(a) for a in scaled)
    return tuple(scaled)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two standard-normal tensors of one shape (per whole tensor):
    keeps the norm a Gaussian sample has, which a straight lerp would shrink."""
    af, bf = a.flatten().double(), b.flatten().double()
    cos = torch.clamp(af @ bf / (af.norm() * bf.norm()), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-6:
        return torch.lerp(a, b, alpha)
    s = torch.sin(theta)
    wa, wb = torch.sin((1 - alpha) * theta) / s, torch.sin(alpha * theta) / s
    return (wa * a.double() + wb * b.double()).to(a.dtype)


@dataclass(frozen=True)
class RowEdit:
    """One image's edit, as the engine receives it. Tensors in the model's data range, [C, H, W].

    inpaint: keep = 1 where ref's pixel is known; superres: ref's p×p patch means are kept;
    colorize: ref's luma is kept (ref = the gray image in every channel);
    variation: start from ref re-noised to the `strength` angle; interpolate: the image's noise
    is slerp(noise(its seed), noise(seed_b), alpha) (no reference)."""

    mode: str
    ref: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    patch: int = 0
    strength: float = 0.0
    seed_b: int = 0
    alpha: float = 0.0


def batch_constraint(
    info: ModelInfo, steps: int, edits: list[RowEdit | None]
) -> tuple[Constraint | None, torch.Tensor | None]:
    """A batch's rows -> (their Constraint, or None if no row is constrained; their times
    [S, B], or None if every row runs the model's schedule). Plain rows get identities."""
    B = len(edits)
    shape = (info.channels, info.image_size, info.image_size)
    c = Constraint.empty(B, shape)
    sched = torch.tensor(info.schedules[steps], dtype=torch.float32)
    times = None
    constrained = False
    for i, e in enumerate(edits):
        if e is None or e.mode == "interpolate":
            continue
        constrained = True
        assert e.ref is not None
        c.ref[i] = e.ref
        if e.mode == "inpaint":
            assert e.keep is not None
            c.keep[i] = e.keep
        elif e.mode == "superres":
            c.patch[i, c.patches.index(e.patch)] = 1.0
        elif e.mode == "colorize":
            c.luma[i] = 1.0
        elif e.mode == "variation":
            c.from_ref[i] = 1.0
            if times is None:
                times = sched[:, None].repeat(1, B)
            times[:, i] = torch.tensor(strength_times(info, steps, e.strength), dtype=torch.float32)
        else:
            raise ValueError(f"unknown edit mode {e.mode!r}")
    return (c if constrained else None), times
