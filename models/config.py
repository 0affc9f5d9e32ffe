"""Frozen architecture configs with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    width: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10  # the embedding has one more row: the "null" class (index num_classes)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.width % 4:
            raise ValueError("width must be a multiple of 4 (2-D sin-cos position embedding)")
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{f.name} must be a positive number, got {v!r}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def flops_per_image(self) -> int:
        """FLOPs of one forward pass for one image (a multiply-add counts 2), from the config.

        Per block over N tokens of width D: qkv 6·N·D², proj 2·N·D², MLP 4·N·D·hidden, attention
        4·N²·D (QKᵀ and PV); per image: adaLN 12·D² per block, the time MLP 4·D², the final adaLN
        4·D²; patch embedding and output 2·N·D·p²·C each. Norms, softmax and elementwise ops are
        left out (well under 1 % at these widths). DiT-XL/2 at 256 tokens: 237 GFLOPs, twice the
        118.6 G multiply-adds the DiT paper reports.
        """
        N, D, p, C = self.num_tokens, self.width, self.patch_size, self.channels
        hidden = int(D * self.mlp_ratio)
        per_block = 8 * N * D * D + 4 * N * D * hidden + 12 * D * D
        return self.depth * per_block + self.attention_flops_per_image() + 8 * D * D + 4 * N * D * p * p * C

    def attention_flops_per_image(self) -> int:
        """The part of `flops_per_image` in attention's two batched products (QKᵀ and PV, 4·N²·D
        per block); the rest is dense matmuls (linears, the patch embedding)."""
        return self.depth * 4 * self.num_tokens**2 * self.width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        missing = known - set(d)
        if missing:
            raise ValueError(f"missing architecture fields: {sorted(missing)}")
        return cls(**d)


PRESETS: dict[str, DiTConfig] = {
    # The shipped MNIST model: 49 tokens of width 192, head dim 32, 4.2 M parameters.
    "mnist-s": DiTConfig(),
    # Small enough for unit tests and the placeholder checkpoint: 16 tokens of width 32.
    "tiny": DiTConfig(patch_size=7, width=32, depth=2, num_heads=2),
    # GPU-sized, for speed (random weights): DiT-B/2 and DiT-XL/2 (Peebles & Xie 2023) on 32x32x4
    # latents (a 256x256 image through an SD-style VAE): 256 tokens, head dims 64 and 72.
    "dit-b2": DiTConfig(
        image_size=32, channels=4, patch_size=2, width=768, depth=12, num_heads=12, num_classes=1000
    ),
    "dit-xl2": DiTConfig(
        image_size=32, channels=4, patch_size=2, width=1152, depth=28, num_heads=16, num_classes=1000
    ),
}
