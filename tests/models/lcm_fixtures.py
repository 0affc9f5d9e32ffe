"""A tiny randomly initialised `LatentConsistencyModelPipeline`, built in code and saved with
`save_pretrained` (nothing is downloaded): the anchor the latent family is checked against.
UNet 8x8x4 latents with a guidance embedding, a 2-level VAE (16x16 RGB images), a 2-layer CLIP
text encoder and a byte-level CLIP tokenizer whose vocabulary this file writes (every byte, alone
and word-final: no merges), with a 16-token window so that truncation is easy to reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 16


def _byte_chars() -> list[str]:
    """CLIP's byte -> printable-unicode table (GPT-2's): every byte gets one character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tokenizer() -> Any:
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {
        t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])
    }
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def _lift(module: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Every weight off its initial value, so each part of the network counts."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def save_lcm_dir(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, time_cond_proj_dim=32, norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tok),
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    )
    sched = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50
    )
    pipe = LatentConsistencyModelPipeline(
        vae=_lift(vae), text_encoder=_lift(text), tokenizer=tok, unet=_lift(unet), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
