"""Accept checks: a per-image score in [0, 1] that a served image must reach to be accepted.

A scorer runs on the engine's compute thread right after the batch that drew the images, over
the whole batch at once, so it must be cheap next to the sampler. Plug one in with
`--scorer MODEL=SPEC`, SPEC being a built-in name (`SCORERS`) or `package.module:factory`, a
callable `factory(card: ModelInfo, device) -> Scorer`.

A scorer that is pure tensor ops can also be a `DeviceScorer`: the runner then scores each batch
where it samples it, inside the batch's CUDA graph on a GPU, instead of as a second, eager pass
over images copied back to the host.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from models.classifier import DEFAULT_CLASSIFIER, load_classifier
from models.interface import ModelInfo


class Scorer(Protocol):
    def __call__(self, images: np.ndarray, labels: list[int | None]) -> np.ndarray:
        """images: uint8 [B, H, W, C] as served; labels: each image's requested class or None.
        -> float [B] in [0, 1], higher is better."""
        ...


def asked_classes(labels: list[int | None], device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch's labels as `DeviceScorer.score_tensor` takes them: int64 [B], -1 where none."""
    return torch.tensor([-1 if y is None else y for y in labels], dtype=torch.long, device=device)


@runtime_checkable
class DeviceScorer(Scorer, Protocol):
    def score_tensor(self, images: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, H, W, C] on the scorer's device; asked: int64 [B], each image's
        requested class or -1 for none -> float32 [B], what `__call__` gives for them. Tensor
        ops only, with no copy to or from the host, so that it can be captured in a graph."""
        ...


class ClassifierScorer:
    """The probability a classifier gives the requested class (for an unconditional image, its
    most likely class): the default check of the shipped MNIST models, with the LeNet that also
    judges class accuracy in `cmserve eval`."""

    def __init__(self, card: ModelInfo, device: torch.device | str = "cpu") -> None:
        if (card.channels, card.image_size, card.num_classes) != (1, 28, 10):
            raise ValueError(f"mnist-lenet scores 28x28 grey 10-class images; {card.name} is not one")
        self.net = load_classifier(DEFAULT_CLASSIFIER).to(device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, labels: list[int | None]) -> np.ndarray:
        x = torch.from_numpy(images).to(self.device)
        scores = self.score_tensor(x, asked_classes(labels, self.device))
        return scores.cpu().numpy().astype(np.float64)

    def score_tensor(self, images: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
        # uint8 [B, 28, 28, 1] -> the classifier's [-0.5, 0.5] range, [B, 1, 28, 28]
        x = images.permute(0, 3, 1, 2).float() / 255.0 - 0.5
        p = torch.softmax(self.net(x), dim=1)  # [B, 10]
        best = p.max(dim=1).values
        of_asked = p.gather(1, asked.clamp(min=0)[:, None])[:, 0]
        return torch.where(asked >= 0, of_asked, best)


SCORERS: dict[str, Callable[[ModelInfo, torch.device | str], Scorer]] = {"mnist-lenet": ClassifierScorer}


def load_scorer(spec: str, card: ModelInfo, device: torch.device | str = "cpu") -> Scorer:
    """A built-in scorer's name, or `module:factory`; ValueError saying what is understood."""
    if spec in SCORERS:
        return SCORERS[spec](card, device)
    module, colon, attr = spec.partition(":")
    if not colon:
        raise ValueError(f"scorer {spec!r}: not one of {sorted(SCORERS)} nor 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scorer {spec!r}: {e}") from None
    scorer: Scorer = factory(card, device)
    return scorer
