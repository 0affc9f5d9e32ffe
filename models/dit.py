"""A DiT (Peebles & Xie 2023) with adaLN-Zero, QK-norm and a null class.

The network knows nothing about noise levels: it maps (x, t, y) to an output of x's shape and
`models.consistency` owns the TrigFlow parametrization around it. Normalization and attention go
through `kernels`, which runs fused Triton kernels on CUDA and torch references elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models.config import DiTConfig
from models.fp8 import Quantized, takes_float8


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the TrigFlow time t in radians, in fp32. t: [B] -> [B, dim].

    Frequencies span 1..1000 rad^-1 geometrically: fine enough to tell apart the times the
    samplers use, and kept in fp32 (half-precision time embeddings cause loss spikes, sCM §4).
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT). -> [grid*grid, width]."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    out_y = ys.reshape(-1, 1) * omega[None]
    out_x = xs.reshape(-1, 1) * omega[None]
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return emb.float()


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # QK-norm: RMSNorm of q and k per head (stabilizes DiT training), fused into the kernel.
        self.q_norm = nn.Parameter(torch.ones(width // num_heads))
        self.k_norm = nn.Parameter(torch.ones(width // num_heads))

    def forward(self, x: torch.Tensor | Quantized) -> torch.Tensor:
        B, N, D = x.shape
        # qkv: [B, N, 3, H, Dh] -> 3 x [B, H, N, Dh]
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = kernels.attention(qkv[0], qkv[1], qkv[2], self.q_norm, self.k_norm)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """adaLN-Zero block: the conditioning sets shift/scale/gate of both sub-layers; gates start at 0.

    The block takes its input already normalized and hands on its output's residual together
    with the next norm of it (the next block's, or the final layer's): each residual add runs
    fused with the norm that follows it (`kernels.residual_adaln_norm`), one pass over the row
    and one kernel fewer per block than a residual add here and a norm in the next block.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn = Attention(width, num_heads)
        hidden = int(width * mlp_ratio)
        # forward runs mlp[0] and its GELU as one op (kernels.linear_gelu); the Sequential keeps
        # the checkpoints' parameter names
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Linear(width, 6 * width)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: [B, D] (already SiLU-activated) -> (shift1, scale1, gate1, shift2, scale2, gate2),
        each [B, D]."""
        return self.ada(c).chunk(6, dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor | Quantized,
        mod: tuple[torch.Tensor, ...],
        next_shift: torch.Tensor,
        next_scale: torch.Tensor,
        float8_next: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | Quantized]:
        """x: [B, N, D] the residual stream; h: adaln_norm(x, shift1, scale1); mod: this block's
        `modulation` -> (x after the block, its adaLN norm with next_shift/next_scale [B, D]).

        With float8 linears (models/fp8.py) the norms hand them their inputs in e4m3
        (`kernels.residual_adaln_norm_fp8`): h is `Quantized`, as is the norm returned when
        `float8_next` (the next block's, not the final layer's), and fc2 applies the GELU as it
        quantizes its input."""
        _, _, gate1, shift2, scale2, gate2 = mod
        a = self.attn(h)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        # x + gate1·a and the MLP's adaLN norm of it, fused into one pass over the row
        if takes_float8(fc1):
            x, q, s = kernels.residual_adaln_norm_fp8(x, gate1, a, shift2, scale2)
            m = fc2(fc1(Quantized(q, s)))
        else:
            x, h2 = kernels.residual_adaln_norm(x, gate1, a, shift2, scale2)
            m = fc2(kernels.linear_gelu(h2, fc1.weight, fc1.bias))
        if float8_next:
            x, q, s = kernels.residual_adaln_norm_fp8(x, gate2, m, next_shift, next_scale)
            return x, Quantized(q, s)
        return kernels.residual_adaln_norm(x, gate2, m, next_shift, next_scale)


class DiT(nn.Module):
    pos: torch.Tensor  # [1, N, D] sin-cos position embedding (a buffer)

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        self.patch = nn.Conv2d(cfg.channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos", sincos_pos_embed(D, cfg.image_size // p)[None], persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)  # row num_classes = null class
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_ada = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, p * p * cfg.channels)
        # (weight [depth·6D + 2D, D], bias) that every adaLN projection's parameters are views
        # of, once `pack_modulation` ran; not a buffer: state dicts keep the per-layer names
        self._ada_pack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_mlp[0], self.t_mlp[2]):
            assert isinstance(lin, nn.Linear)
            nn.init.normal_(lin.weight, std=0.02)
        w = self.patch.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        assert self.patch.bias is not None
        nn.init.zeros_(self.patch.bias)
        # adaLN-Zero: every residual branch and the output start at zero.
        for blk in self.blocks:
            assert isinstance(blk, Block)
            nn.init.zeros_(blk.ada.weight)
            nn.init.zeros_(blk.ada.bias)
        for m in (self.final_ada, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def _ada_linears(self) -> list[nn.Linear]:
        blocks: list[Block] = list(self.blocks)  # type: ignore[arg-type]
        return [blk.ada for blk in blocks] + [self.final_ada]

    def pack_modulation(self) -> None:
        """Lay every adaLN projection (each block's and the final layer's) out as rows of one
        weight, so that forward computes all the modulations with one matmul, [B, D] x
        [D, depth·6D + 2D], instead of depth + 1 small ones (on a GPU at batch 1 each is a
        launch that reads its weights; together they hold a third of DiT-B/2's). The parameters
        keep their names and shapes as views of that weight, so state dicts and
        `load_state_dict` are unchanged. Call it after any `.to()`: moving a module gives every
        parameter storage of its own again, and forward then falls back to one matmul each."""
        lins = self._ada_linears()
        w = torch.cat([lin.weight.detach() for lin in lins])
        b = torch.cat([lin.bias.detach() for lin in lins])
        row = 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight.data, lin.bias.data = w[row : row + n], b[row : row + n]
            row += n
        self._ada_pack = (w, b)

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed (weight, bias) while the projections are still its views."""
        if self._ada_pack is None:
            return None
        w, b = self._ada_pack
        lins = self._ada_linears()
        first, last = lins[0], lins[-1]
        same = (
            first.weight.data_ptr() == w.data_ptr()
            and last.bias.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        )
        return (w, b) if same else None

    def modulations(self, c: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
        """c: [B, D] (SiLU-activated) -> (each block's 6 modulation tensors, the final layer's
        (shift, scale)), each [B, D]."""
        packed = self._packed()
        if packed is None:
            blocks: list[Block] = list(self.blocks)  # type: ignore[arg-type]
            return [blk.modulation(c) for blk in blocks], tuple(self.final_ada(c).chunk(2, dim=-1))
        D = self.cfg.width
        m = F.linear(c, *packed)  # [B, depth·6D + 2D]
        per_block = [mb.chunk(6, dim=-1) for mb in m[:, : -2 * D].split(6 * D, dim=-1)]
        return per_block, tuple(m[:, -2 * D :].chunk(2, dim=-1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position: x [B, C, H, W] -> the residual stream [B, N, D],
        contiguous (every fused norm would otherwise copy it first).

        The stride-p conv `self.patch` (kept for the checkpoints' names) runs as one matmul over
        the patches, [B·N, C·p·p] x [C·p·p, D], with its bias in the matmul: the conv's output
        is in [B, D, N] order and its bias a separate pass, and on a GPU cuDNN's kernel for this
        shape was slow."""
        B, C, H, W = x.shape
        p, g = self.cfg.patch_size, H // self.cfg.patch_size
        # [B, C, g, p, g, p] -> [B, g·g, C·p·p]: tokens row-major over the grid, features in the
        # conv weight's (C, p, p) order; a copy of the input, which is small
        patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
        w = self.patch.weight.view(self.cfg.width, C * p * p)
        return self.pos + F.linear(patches, w, self.patch.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] fp32 radians; y: [B] int64 in [0, num_classes] -> [B, C, H, W]."""
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        h = self.embed(x)  # [B, N, D]
        c = self.t_mlp(timestep_embedding(t, self.cfg.width).to(h.dtype)) + self.y_embed(y)
        c = F.silu(c)  # [B, D]
        blocks: list[Block] = list(self.blocks)  # type: ignore[arg-type]
        mods, final = self.modulations(c)
        # the norm after each block is the next block's first (shift1, scale1), or the final one
        norms = [m[:2] for m in mods[1:]] + [final]
        # float8 blocks take each norm in e4m3, but for the final layer's (models/fp8.py)
        fp8 = takes_float8(blocks[0].attn.qkv)
        x_res = h
        h_in: torch.Tensor | Quantized = (
            Quantized(*kernels.adaln_norm_fp8(h, mods[0][0], mods[0][1]))
            if fp8
            else kernels.adaln_norm(h, mods[0][0], mods[0][1])
        )
        for i, (blk, mod, (shift, scale)) in enumerate(zip(blocks, mods, norms, strict=True)):
            x_res, h_in = blk(x_res, h_in, mod, shift, scale, float8_next=fp8 and i + 1 < len(blocks))
        assert isinstance(h_in, torch.Tensor)  # the final norm is never float8
        h = self.out(h_in)  # [B, N, p*p*C]
        g = H // p
        h = h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return h.reshape(B, C, H, W)
