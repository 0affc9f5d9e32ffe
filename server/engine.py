"""The engine owns the model and the runner, and turns (steps, labels, seeds) into images.

Every torch call of a server process runs on the engine's one compute thread (`Engine.call`,
`Engine.executor`): loading, warm-up and every batch. Why: on the CPU each thread that starts a
torch op gets its own OpenMP team, and once two teams exist they fight over the cores (on 2
cores batches took about 3x longer once a second thread had run one: `cmserve bench threads`,
docs/performance.md).

Noise comes from one CPU generator per image seeded with that image's seed, so an image never
depends on its batch-mates or the device's RNG.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.grid import to_uint8
from models.placeholder import build_placeholder
from server.metrics import Metrics
from server.runner import SamplerRunner
from server.settings import Settings

log = logging.getLogger("cmserve.engine")
T = TypeVar("T")


class NonFiniteOutput(RuntimeError):
    reason = "nonfinite"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return dev


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, *, inline: bool = False) -> None:
        """inline: no compute thread of its own; `call` runs on the caller's thread (for a host
        that already runs every model call on one thread of its own, like LitServe's worker)."""
        self.settings = settings
        self.metrics = metrics
        self.executor = None if inline else ThreadPoolExecutor(1, thread_name_prefix="cmserve-compute")
        try:
            self.call(self._load)
        except BaseException:
            self.close()
            raise

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the compute thread and wait for it (from any thread but that one)."""
        if self.executor is None:
            return fn(*args)
        return self.executor.submit(fn, *args).result()

    def close(self, wait: bool = True) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=wait)

    def _load(self) -> None:
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)  # here: the thread that runs the ops
        self.device = pick_device(settings.device)
        path = settings.checkpoint_path()
        self.placeholder = False
        if not settings.checkpoint and not path.is_file():
            # No trained weights shipped (or the package was installed without them).
            tmp = Path(tempfile.mkdtemp(prefix="cmserve-placeholder-"))
            path = build_placeholder(tmp / "placeholder")
            self.placeholder = True
            log.warning(
                "no default checkpoint at %s: serving an UNTRAINED placeholder model",
                settings.checkpoint_path(),
            )
        self.model, self.card = load_checkpoint(path, self.device)
        self.placeholder = self.placeholder or bool(self.card.provenance.get("placeholder"))
        use_graphs = settings.backend == "graph" or (
            settings.backend == "auto" and self.device.type == "cuda"
        )
        if use_graphs and self.device.type != "cuda":
            raise RuntimeError("backend 'graph' needs a CUDA device")
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if settings.dtype == "auto" else getattr(torch, settings.dtype)
        self.runner = SamplerRunner(
            self.model,
            self.card,
            settings.buckets,
            self.device,
            use_graphs=use_graphs,
            dtype=dtype,
            metrics=self.metrics,
        )

    @property
    def supported_steps(self) -> list[int]:
        return self.card.steps

    def warmup(self) -> float:
        """Build, run (and on CUDA capture) every slot on the compute thread; -> seconds."""
        t0 = time.perf_counter()
        self.call(self.runner.warmup, self.supported_steps)
        return time.perf_counter() - t0

    def auto_max_batch(self, tolerance: float = 0.05) -> int:
        """The smallest bucket whose images/s is within `tolerance` of the best bucket's, timed
        here at the default step count. Why: a bigger batch makes everyone in it wait longer, so it
        is only worth it while it still buys throughput. On a GPU that is the largest bucket or near
        it; on a small CPU a middle bucket (the timings are logged at start-up and can be close
        enough to differ between start-ups: docs/performance.md). Times on the compute thread."""
        steps = 2 if 2 in self.card.schedules else self.card.steps[0]
        secs = self.call(self.runner.time_buckets, steps)
        rate = {b: b / s for b, s in secs.items()}
        best = max(rate.values())
        chosen = min(b for b, r in rate.items() if r >= (1 - tolerance) * best)
        log.info(
            "max batch size %d (auto; images/s per bucket at %d steps: %s)",
            chosen,
            steps,
            ", ".join(f"{b}: {r:.1f}" for b, r in rate.items()),
        )
        return chosen

    def make_noise(self, steps: int, seeds: list[int]) -> torch.Tensor:
        """-> [S, B, C, H, W]: image i's noise for every step from its own generator."""
        shape = (self.runner.noise_slices(steps), *self.runner.image_shape)
        per_image = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(per_image, dim=1)

    def sample(self, steps: int, labels: list[int | None], seeds: list[int]) -> torch.Tensor:
        """-> x0 [B, C, H, W] fp32 in data space ([-0.5, 0.5] for MNIST)."""
        null = self.card.arch.num_classes
        y = torch.tensor([null if lab is None else lab for lab in labels], dtype=torch.long)
        return self.runner.run(steps, self.make_noise(steps, seeds), y)

    def run_batch(self, steps: int, labels: list[int | None], seeds: list[int]) -> np.ndarray:
        x = self.sample(steps, labels, seeds)
        if not torch.isfinite(x).all():
            raise NonFiniteOutput("sampler output holds non-finite values")
        return to_uint8(x)
