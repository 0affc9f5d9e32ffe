"""The checkpoint format: `<name>.safetensors` (weights) beside `<name>.json` (the card).

The card holds the architecture, σ_d, class names, the sampling schedule of every supported
step count, provenance, and the SHA-256 of the weights file. `load_checkpoint` checks all of it
and raises `CheckpointError` naming what is wrong rather than serving a model that is not the
one described.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.config import DiTConfig
from models.consistency import TrigFlow, validate_schedule
from models.dit import DiT
from models.interface import KINDS, ModelInfo

FORMAT = "cmserve.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as described; the message says why."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    kind: str  # "consistency" (few-step) or "diffusion" (a teacher, sampled with the ODE)
    arch: DiTConfig
    class_names: tuple[str, ...]
    sigma_d: float
    schedules: dict[int, tuple[float, ...]]
    provenance: dict[str, Any] = field(default_factory=dict)
    default_steps: int | None = None  # what a request without `steps` gets (ModelInfo.steps_default)
    guidance: float = 1.0  # a diffusion teacher's classifier-free guidance scale when served

    @property
    def steps(self) -> list[int]:
        return sorted(self.schedules)

    def info(self, name: str | None = None) -> ModelInfo:
        """How the server sees this checkpoint (served as `name`, default the card's)."""
        return ModelInfo(
            name=name or self.name,
            family="trigflow",
            kind=self.kind,
            channels=self.arch.channels,
            image_size=self.arch.image_size,
            class_names=self.class_names,
            schedules=self.schedules,
            value_range=(-0.5, 0.5),
            null_label=self.arch.num_classes,  # the DiT's extra embedding row
            default_steps=self.default_steps,
            provenance=self.provenance,
            sigma_data=self.sigma_d,
        )

    def to_json(self, weights_file: str, sha256: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "architecture": self.arch.to_dict(),
            "classes": list(self.class_names),
            "sigma_d": self.sigma_d,
            "schedules": {str(k): list(v) for k, v in sorted(self.schedules.items())},
            **({} if self.default_steps is None else {"default_steps": self.default_steps}),
            **({} if self.guidance == 1.0 else {"guidance": self.guidance}),
            "provenance": self.provenance,
            "weights": {"file": weights_file, "sha256": sha256},
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_paths(path: str | Path) -> tuple[Path, Path]:
    """'dir/name', 'dir/name.json' or 'dir/name.safetensors' -> (json, safetensors)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def save_checkpoint(path: str | Path, model: TrigFlow, card: ModelCard) -> Path:
    """Write weights and card; returns the JSON path. Weights are saved contiguous fp32."""
    js, st = card_paths(path)
    js.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.net.state_dict().items()}
    save_file(tensors, str(st))
    js.write_text(json.dumps(card.to_json(st.name, _sha256(st)), indent=2) + "\n")
    return js


def _need(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"{where}: missing field '{key}'")
    v = d[key]
    if not isinstance(v, typ) or isinstance(v, bool):
        raise CheckpointError(f"{where}: field '{key}' has type {type(v).__name__}")
    return v


def parse_card(raw: dict[str, Any], where: str) -> tuple[ModelCard, dict[str, Any]]:
    """Validate a card's JSON -> (ModelCard, weights entry)."""
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a cmserve checkpoint (format={raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    name = _need(raw, "name", str, where)
    kind = _need(raw, "kind", str, where)
    if kind not in KINDS:
        raise CheckpointError(f"{where}: kind {kind!r} is not one of {KINDS}")
    try:
        arch = DiTConfig.from_dict(_need(raw, "architecture", dict, where))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad architecture: {e}") from None
    classes = _need(raw, "classes", list, where)
    if len(classes) != arch.num_classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{where}: 'classes' must be {arch.num_classes} names, got {len(classes)}")
    sigma_d = float(_need(raw, "sigma_d", (int, float), where))
    if not (math.isfinite(sigma_d) and sigma_d > 0):
        raise CheckpointError(f"{where}: sigma_d must be positive, got {sigma_d}")
    schedules: dict[int, tuple[float, ...]] = {}
    for k, v in _need(raw, "schedules", dict, where).items():
        try:
            steps = int(k)
            if kind == "consistency":
                validate_schedule(steps, v)
            schedules[steps] = tuple(float(a) for a in v)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad schedule for {k} steps: {e}") from None
    if not schedules:
        raise CheckpointError(f"{where}: no sampling schedule")
    weights = _need(raw, "weights", dict, where)
    _need(weights, "file", str, where + " weights")
    _need(weights, "sha256", str, where + " weights")
    prov = raw.get("provenance", {})
    default_steps = raw.get("default_steps")
    if default_steps is not None and (isinstance(default_steps, bool) or default_steps not in schedules):
        raise CheckpointError(f"{where}: default_steps {default_steps!r} is not one of {sorted(schedules)}")
    guidance = raw.get("guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 20:
        raise CheckpointError(f"{where}: guidance must be a number in [0, 20], got {guidance!r}")
    card = ModelCard(
        name,
        kind,
        arch,
        tuple(classes),
        sigma_d,
        schedules,
        prov if isinstance(prov, dict) else {},
        default_steps,
        float(guidance),
    )
    return card, weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[TrigFlow, ModelCard]:
    """Load and check a checkpoint -> (TrigFlow model in eval mode, card)."""
    js, _ = card_paths(path)
    if not js.is_file():
        raise CheckpointError(f"{js}: no such checkpoint card")
    try:
        raw = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{js}: card is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{js}: card is not a JSON object")
    card, weights = parse_card(raw, str(js))
    st = js.parent / weights["file"]
    if not st.is_file():
        raise CheckpointError(f"{js}: weights file {st.name} is missing")
    digest = _sha256(st)
    if digest != weights["sha256"]:
        raise CheckpointError(
            f"{st}: SHA-256 {digest[:12]}… does not match the card's {weights['sha256'][:12]}… "
            "(corrupt or replaced)"
        )
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{st}: unreadable safetensors file: {e}") from None
    net = DiT(card.arch)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{st}: weights do not match the architecture: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise CheckpointError(
                f"{st}: tensor {k} has shape {tuple(tensors[k].shape)}, architecture needs {tuple(v.shape)}"
            )
        if not torch.isfinite(tensors[k]).all():
            raise CheckpointError(f"{st}: tensor {k} holds non-finite values")
    net.load_state_dict(tensors)
    model = TrigFlow(net, card.sigma_d).to(device).eval()
    model.requires_grad_(False)
    net.pack_modulation()  # after the move to the device (DiT.pack_modulation)
    model.guidance = card.guidance
    return model, card
