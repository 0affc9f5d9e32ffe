"""Tensor images <-> PNG: single images for the server and sample grids for docs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch


def quantize(x: torch.Tensor, value_range: tuple[float, float] = (-0.5, 0.5)) -> torch.Tensor:
    """x: [B, C, H, W] fp32 with values in `value_range` -> uint8 [B, H, W, C] (rounded,
    clipped; a permuted view) on x's device: the runner quantizes on the GPU, so a quarter of
    the bytes cross to the host and the host runs none of these ops."""
    lo, hi = value_range
    y = (((x - lo) / (hi - lo)).clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return y.permute(0, 2, 3, 1)


def to_uint8(x: torch.Tensor, value_range: tuple[float, float] = (-0.5, 0.5)) -> np.ndarray:
    """x: [B, C, H, W] with values in `value_range` -> uint8 [B, H, W, C] (rounded, clipped)."""
    return quantize(x.detach().float().cpu(), value_range).numpy()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # gray, RGB, RGBA (PNG spec, IHDR)


def _chunk(kind: bytes, data: bytes) -> bytes:
    # length, type, data, CRC-32 over type + data
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_bytes(img: np.ndarray) -> bytes:
    """img: uint8 [H, W, C] with C = 1, 3 or 4 -> an 8-bit PNG (no filtering, zlib level 1).

    Written out here rather than through Pillow because the server encodes one small image per
    request on its event loop, where Pillow's plugin machinery costs more than the compression
    itself (the same pixels; the bytes differ). zlib level 1: several times faster than level
    6, a few % larger."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in _COLOR_TYPE:
        raise ValueError(f"expected uint8 [H, W, 1|3|4], got {img.dtype} {list(img.shape)}")
    h, w, c = img.shape
    rows = np.zeros((h, 1 + w * c), np.uint8)  # each scanline starts with its filter type, 0 = none
    rows[:, 1:] = img.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)  # 8 bits, deflate, no interlace
    idat = zlib.compress(rows.tobytes(), 1)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def save_grid(x: torch.Tensor, rows: int, path: str | Path, upscale: int = 2) -> None:
    """x: [rows*cols, C, H, W] -> a rows x cols PNG grid, row-major."""
    imgs = to_uint8(x)
    B, H, W, C = imgs.shape
    cols = B // rows
    grid = (
        imgs[: rows * cols]
        .reshape(rows, cols, H, W, C)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * H, cols * W, C)
    )
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png_bytes(grid))
