from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.placeholder import build_placeholder


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return build_placeholder(tmp_path / "m")


def test_roundtrip_keeps_weights_and_card(ckpt: Path) -> None:
    model, card = load_checkpoint(ckpt)
    assert card.name == "placeholder-untrained"
    assert card.steps == [1, 2, 3, 4]
    assert len(card.class_names) == card.arch.num_classes
    saved = load_file(str(ckpt.with_suffix(".safetensors")))
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, saved[k])
    # loaded, the adaLN projections are views of one packed weight; saved again, each is its own
    assert model.net._packed() is not None  # type: ignore[operator]
    again = save_checkpoint(ckpt.parent / "again", model, card)
    assert again.with_suffix(".safetensors").read_bytes() == ckpt.with_suffix(".safetensors").read_bytes()


def _edit(ckpt: Path, fn) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads(ckpt.read_text())
    fn(raw)
    ckpt.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r.update(format="other"), "not a cmserve checkpoint"),
        (lambda r: r.update(format_version=99), "format_version"),
        (lambda r: r.pop("sigma_d"), "missing field 'sigma_d'"),
        (lambda r: r.update(sigma_d=-1), "sigma_d must be positive"),
        (lambda r: r.update(kind="gan"), "kind"),
        (lambda r: r.update(classes=["a"]), "'classes' must be 10 names"),
        (lambda r: r["schedules"].update({"2": [1.0, 1.2]}), "bad schedule for 2 steps"),
        (lambda r: r["architecture"].update(width=64, num_heads=2), "weights do not match|has shape"),
        (lambda r: r["architecture"].update(depth=3), "missing"),
        (lambda r: r["architecture"].update(patch_size=5), "bad architecture"),
        (lambda r: r.update(default_steps=3.5), "default_steps"),
        (lambda r: r.update(default_steps=8), "default_steps 8 is not one of"),
        (lambda r: r.update(guidance="strong"), "guidance must be a number"),
        (lambda r: r.update(guidance=-1), "guidance must be a number"),
    ],
)
def test_mismatched_card_is_refused_with_a_clear_error(ckpt: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    _edit(ckpt, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)


def test_corrupt_weights_are_refused(ckpt: Path) -> None:
    st = ckpt.with_suffix(".safetensors")
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(ckpt)


def test_truncated_weights_with_matching_hash_are_refused(ckpt: Path) -> None:
    import hashlib

    st = ckpt.with_suffix(".safetensors")
    st.write_bytes(st.read_bytes()[:100])
    _edit(ckpt, lambda r: r["weights"].update(sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(ckpt)


def test_non_finite_weights_are_refused(ckpt: Path) -> None:
    import hashlib

    st = ckpt.with_suffix(".safetensors")
    tensors = load_file(str(st))
    tensors["out.weight"][0, 0] = float("nan")
    save_file(tensors, str(st))
    _edit(ckpt, lambda r: r["weights"].update(sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(ckpt)


def test_missing_files_and_bad_json(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing.json")
    other = tmp_path / "copy.json"
    shutil.copy(ckpt, other)
    _edit(other, lambda r: r["weights"].update(file="gone.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(other)
    ckpt.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_guidance_of_a_teacher_card_reaches_its_ode_velocity(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r.update(kind="diffusion", guidance=1.75))
    model, card = load_checkpoint(ckpt)
    assert card.guidance == model.guidance == 1.75
    assert card.to_json("w.safetensors", "0" * 64)["guidance"] == 1.75
    x, t, y = torch.randn(2, 1, 28, 28), torch.full((2,), 0.8), torch.tensor([1, 2])
    assert torch.equal(model.ode_velocity(x, t, y), model.guided_velocity(x, t, y, 1.75))
    assert not torch.equal(model.ode_velocity(x, t, y), model.velocity(x, t, y))
