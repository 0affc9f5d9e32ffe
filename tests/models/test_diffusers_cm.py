"""The edm family against its anchor: diffusers' own ConsistencyModelPipeline on the same
weights, initial noise, per-step noise, timesteps and classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError
from models.load import load_model
from models.sampler import consistency_sample
from tests.models.diffusers_fixtures import save_cm_dir

pytest.importorskip("diffusers")

CLASSES = 5


def pipeline_x0(
    path: Path, labels: list[int] | None, timesteps: list[int], noise: torch.Tensor
) -> torch.Tensor:
    """diffusers' sample for noise [S, B, C, H, W]: slice 0 is the initial latent, slice i the
    noise the scheduler draws after step i (diffusers draws one after the last step too, unused)."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    pipe = ConsistencyModelPipeline(
        unet=UNet2DModel.from_pretrained(path / "unet"),
        scheduler=CMStochasticIterativeScheduler.from_pretrained(path / "scheduler"),
    )
    B = noise.shape[1]
    # the scheduler's per-step draws, replaced by ours in order
    draws = iter([*noise[1:], torch.zeros_like(noise[0])])
    import diffusers.schedulers.scheduling_consistency_models as sched_mod

    orig = sched_mod.randn_tensor
    sched_mod.randn_tensor = lambda shape, **kw: next(draws).clone()
    try:
        out = pipe(
            batch_size=B, class_labels=labels, timesteps=timesteps, latents=noise[0].clone(), output_type="pt"
        ).images
    finally:
        sched_mod.randn_tensor = orig
    return (out - 0.5) * 2  # the pipeline's output is x0/2 + 1/2 (x0 already clipped to [-1, 1])


@pytest.mark.parametrize("conditional", [True, False], ids=["class-conditional", "unconditional"])
@pytest.mark.parametrize("timesteps", [[0], [22, 0]], ids=["1-step", "2-step"])
def test_edm_family_equals_the_diffusers_pipeline(
    tmp_path: Path, conditional: bool, timesteps: list[int]
) -> None:
    card = {"schedules": {str(len(timesteps)): timesteps}}
    path = save_cm_dir(tmp_path / "cm", CLASSES if conditional else None, card)
    model, info = load_model(path)
    S, B = len(timesteps), 4
    noise = torch.randn((S, B, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    labels = [0, 3, 4, 1] if conditional else None
    with torch.no_grad():
        ours = consistency_sample(
            model, noise, torch.tensor(labels or [0] * B), torch.tensor(info.schedules[S])
        )
    want = pipeline_x0(path, labels, timesteps, noise)
    # the same fp32 formulas; what differs is rounding (the pipeline takes 250·ln σ from the fp64
    # σ, we from its fp32 value; x0/2 + 1/2 and back): 6e-8 measured, the bound 1e-4
    assert (ours - want).abs().max().item() <= 1e-4
    assert ours.abs().max() > 0.05 and ours.std() > 0.01  # a real output, not a constant
    if conditional:  # the label reaches the network
        other = consistency_sample(model, noise, torch.tensor([2, 2, 2, 2]), torch.tensor(info.schedules[S]))
        assert (other - ours).abs().max() > 1e-3


def test_default_schedules_follow_the_scheduler(tmp_path: Path) -> None:
    """Without a card: s steps = grid indices 0, 40//s, ... (the pipeline's num_inference_steps)."""
    from diffusers import CMStochasticIterativeScheduler

    path = save_cm_dir(tmp_path / "cm", CLASSES)
    _, info = load_model(path)
    assert info.family == "edm" and info.name == "cm" and info.class_names == tuple("01234")
    assert info.steps == [1, 2, 3, 4] and info.value_range == (-1.0, 1.0) and not info.unconditional_ok
    sched = CMStochasticIterativeScheduler.from_pretrained(path / "scheduler")
    for s in info.steps:
        sched.set_timesteps(num_inference_steps=s)
        assert list(info.schedules[s]) == sched.sigmas[:-1].tolist()


@pytest.mark.parametrize(
    ("card", "unet_classes", "message"),
    [
        ({"classes": ["a"] * 7}, CLASSES, "names 7 classes but the UNet embeds 5"),
        ({"schedules": {"2": [22, 5]}}, CLASSES, "end at 0"),
        ({"schedules": {"2": [0, 22]}}, CLASSES, "must descend"),
        ({"schedules": {"2": [45, 0]}}, CLASSES, "grid indices must be distinct and in [0, 39]"),
        ({"schedules": {"3": [22, 0]}}, CLASSES, "must be 3 grid indices"),
        ({"default_steps": 8}, CLASSES, "default_steps 8 is not one of [1, 2, 3, 4]"),
    ],
)
def test_mismatched_cards_fail_at_load(tmp_path: Path, card: dict, unet_classes: int, message: str) -> None:  # type: ignore[type-arg]
    path = save_cm_dir(tmp_path / "cm", unet_classes, card)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_model(path)


def test_scheduler_outside_the_family_fails_at_load(tmp_path: Path) -> None:
    path = save_cm_dir(tmp_path / "cm", CLASSES)
    cfg_path = path / "scheduler" / "scheduler_config.json"
    for change, message in (
        ({"sigma_min": 100.0}, "sigma_min < sigma_max"),
        ({"sigma_max": 1e9}, "sigma_max 1000000000.0 is outside"),
        ({"s_noise": 1.5}, "s_noise 1.5 is not supported"),
        ({"_class_name": "DDPMScheduler"}, "needs CMStochasticIterativeScheduler"),
    ):
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
        cfg_path.write_text(json.dumps(cfg))


def test_unsupported_layouts_name_what_is_understood(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="unet/config.json.*understands.*cmserve checkpoint.*diffusers"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "nothing")
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="missing.*scheduler_config.json"):
        load_model(half)
