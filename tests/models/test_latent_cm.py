"""The latent family against diffusers' own `LatentConsistencyModelPipeline`: a tiny random
pipeline built in code (tests/models/lcm_fixtures.py), the same latents, per-step noise, prompt
and guidance scale; cmserve's sampler and the pipeline must give the same images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from models.latent_cm import TableFull, load_latent_cm  # noqa: E402
from models.load import load_model  # noqa: E402
from models.sampler import consistency_sample  # noqa: E402
from tests.models.lcm_fixtures import MAX_TOKENS, save_lcm_dir  # noqa: E402

# fp32 on the CPU the images come out bit-identical (max |diff| 0 when this was written); the
# bound leaves room for another BLAS ordering c_skip/c_out's float32 products (torch tensors here,
# the scheduler's 0-d tensors there) differently: 1e-4 of the [0, 1] pixel range.
TOL = 1e-4


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lcm_dir(tmp_path_factory.mktemp("lcm") / "tiny-lcm")


@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_images_equal_the_diffusers_pipeline(lcm_dir: Path, steps: int, guidance: float) -> None:
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        str(lcm_dir), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    prompt = "red cube"  # 8 tokens + start and end: inside the 16-token window
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    want = pipe(
        prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
        generator=torch.Generator().manual_seed(4), output_type="pt",
    ).images  # fmt: skip
    # the scheduler draws each step's re-noising noise from that generator, in step order
    g = torch.Generator().manual_seed(4)
    noise = torch.stack([latents[0]] + [torch.randn((1, 4, 8, 8), generator=g)[0] for _ in range(steps - 1)])
    model, info = load_model(lcm_dir)
    row, cut = model.conditions.acquire(prompt, guidance)  # type: ignore[attr-defined]
    assert not cut
    times = torch.tensor(info.schedules[steps], dtype=torch.float32)
    with torch.inference_mode():
        x0 = consistency_sample(model, noise[:, None], torch.tensor([row]), times)
        got = (model.decode(x0) / 2 + 0.5).clamp(0, 1)  # type: ignore[attr-defined]
    assert info.family == "latent" and info.conditioning == "text" and info.image_size == 16
    assert got.shape == want.shape == (1, 3, 16, 16)
    diff = (got - want).abs().max().item()
    print(f"\nlatent vs LatentConsistencyModelPipeline, {steps} steps, w {guidance}: max |diff| {diff:.2e}")
    assert diff < TOL, diff


def test_text_table_caches_pins_and_truncates(lcm_dir: Path) -> None:
    model, _ = load_latent_cm(lcm_dir, cache_slots=2)
    c = model.conditions
    a, cut = c.acquire("short", 4.0)
    assert not cut and (c.hits, c.misses) == (0, 1)
    assert c.acquire("short", 4.0) == (a, False) and c.hits == 1  # same (prompt, w): same row
    b, _ = c.acquire("other", 4.0)
    assert b != a
    with pytest.raises(TableFull, match="queued requests"):  # both rows pinned: nothing to evict
        c.acquire("third", 4.0)
    c.release(a)
    c.release(a)  # a is free once its two users are done: the least recently used goes
    d, long_cut = c.acquire("x " * (2 * MAX_TOKENS), 4.0)
    assert d == a and long_cut  # longer than the tokenizer's window: truncated, and said so
    # the row holds the encoder's output of the truncated tokens
    ids, _ = c.tokens("x " * (2 * MAX_TOKENS))
    with torch.inference_mode():
        assert torch.equal(c.emb[d], c.encoder(ids)[0][0])
