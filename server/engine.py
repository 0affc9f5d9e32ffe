"""The engine owns the served models and their runners, and turns (model, steps, labels, seeds)
into images.

Every torch call of a server process runs on the engine's one compute thread (`Engine.call`,
`Engine.executor`): loading, warm-up and every batch. Why: on the CPU each thread that starts a
torch op gets its own OpenMP team, and once two teams exist they fight over the cores (on 2
cores batches took about 3x longer once a second thread had run one: `cmserve bench threads`,
docs/performance.md).

Noise comes from one CPU generator per image seeded with that image's seed, so an image never
depends on its batch-mates or the device's RNG.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from models import fp8
from models.editing import Constraint, RowEdit, batch_constraint, slerp
from models.interface import ConsistencyModel, ModelInfo
from models.load import load_model
from models.placeholder import build_placeholder
from models.scorers import DeviceScorer, Scorer, asked_classes, load_scorer
from server.metrics import Metrics
from server.runner import SamplerRunner, reserved_bytes
from server.settings import SHIPPED_SCORER, SHIPPED_TEACHER, Settings
from server.step_runner import Finished, StepRow, StepRunner
from server.tiers import Tier, ladder

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8": torch.float8_e4m3fn}  # fmt: skip


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The network's dtype for `--dtype name`: 'auto' is bfloat16 on CUDA and float32 on the CPU;
    float8 (models/fp8.py) needs row-scaled float8 matmuls, on CUDA from compute capability 9.0."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float8" and not fp8.supported(device):
        raise RuntimeError("dtype float8 needs a GPU of compute capability 9.0 or above (Hopper)")
    return DTYPES[name]


@dataclass
class ServedModel:
    """One model of the server: its network, what it is, and its runner (buffers, graphs)."""

    card: ModelInfo
    model: ConsistencyModel
    runner: SamplerRunner
    placeholder: bool
    weights_bytes: int
    graph_bytes: int = 0
    stepper: StepRunner | None = None  # with --batching step: the per-evaluation runner
    scorer: Scorer | None = None  # the accept check (models/scorers.py); None = images not scored
    tiers: list[Tier] = field(default_factory=list)  # quality tiers, cheapest first (server/tiers.py)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def accept_check(self) -> bool:
        return self.scorer is not None


class ModelFacts(Protocol):
    """What the HTTP front end reads of a served model: a `ServedModel` in the engine's own
    process, a `server.remote.ModelView` in a front-end process of its own."""

    @property
    def card(self) -> ModelInfo: ...
    @property
    def tiers(self) -> list[Tier]: ...
    @property
    def placeholder(self) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def accept_check(self) -> bool: ...


class EngineFacts(Protocol):
    """What the HTTP front end asks of the engine: `Engine`, or `server.remote.EngineView`."""

    @property
    def default(self) -> str: ...
    @property
    def models(self) -> Mapping[str, ModelFacts]: ...
    def get(self, name: str | None = None) -> ModelFacts: ...
    async def acquire_text(self, model: str, prompt: str, w: float) -> tuple[int, bool, bool]: ...
    def release_text(self, model: str, row: int) -> None: ...
    def close(self, wait: bool = True) -> None: ...


class UnknownModel(KeyError):
    pass


M = TypeVar("M")


def pick(models: Mapping[str, M], default: str, name: str | None) -> M:
    """The model served as `name` (None: the default); UnknownModel if none is."""
    try:
        return models[name or default]
    except KeyError:
        raise UnknownModel(name) from None


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, *, inline: bool = False) -> None:
        """inline: no compute thread of its own; `call` runs on the caller's thread (for a host
        that already runs every model call on one thread of its own, like LitServe's worker)."""
        self.settings = settings
        self.metrics = metrics
        self.executor = None if inline else ThreadPoolExecutor(1, thread_name_prefix="cmserve-compute")
        # (images, their scores) of the last batch `run_batch` scored on the device
        self._batch_scores: tuple[np.ndarray, np.ndarray] | None = None
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
        use_graphs = settings.backend == "graph" or (
            settings.backend == "auto" and self.device.type == "cuda"
        )
        if use_graphs and self.device.type != "cuda":
            raise RuntimeError("backend 'graph' needs a CUDA device")
        dtype = compute_dtype(settings.dtype, self.device)
        self.models: dict[str, ServedModel] = {}
        references = dict(r.split("=", 1) for r in settings.references)
        scorers = dict(r.split("=", 1) for r in settings.scorers)
        paths = settings.model_paths()
        shipped: set[str] = set()  # served names of the shipped models (their default scorer)
        for name, path in paths:
            placeholder = False
            if path is None:  # the shipped model, unless the package was installed without it
                path = settings.checkpoint_path()
                if not path.is_file():
                    tmp = Path(tempfile.mkdtemp(prefix="cmserve-placeholder-"))
                    log.warning("no default checkpoint at %s: serving an UNTRAINED placeholder model", path)
                    path, placeholder = build_placeholder(tmp / "placeholder"), True
            model, card = load_model(path, self.device, name)
            if not placeholder and path.resolve().parent == SHIPPED_TEACHER.parent:
                shipped.add(card.name)
                if card.kind == "consistency" and settings.shipped_reference and SHIPPED_TEACHER.is_file():
                    teacher = json.loads(SHIPPED_TEACHER.read_text())["name"]
                    references.setdefault(card.name, teacher)
                    if all(n != teacher and p != SHIPPED_TEACHER for n, p in paths):
                        paths.append((None, SHIPPED_TEACHER))  # loaded by this same loop, last
            if card.name in self.models:
                raise ValueError(f"two models are named {card.name!r}; name them: --model NAME=PATH")
            placeholder = placeholder or bool(card.provenance.get("placeholder"))
            spec = scorers.get(card.name, SHIPPED_SCORER if card.name in shipped else None)
            scorer = load_scorer(spec, card, self.device) if spec and spec != "none" else None
            runner = SamplerRunner(
                model,
                card,
                settings.buckets,
                self.device,
                use_graphs=use_graphs,
                dtype=dtype,
                metrics=self.metrics,
                # a tensor-op scorer runs where the images are made: in the batch's graph
                scorer=scorer if isinstance(scorer, DeviceScorer) else None,
            )
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # type: ignore[attr-defined]
            stepper = None
            if settings.batching == "step":
                stepper = StepRunner(
                    model, card, settings.buckets, self.device, use_graphs=use_graphs, metrics=self.metrics
                )
            self.models[card.name] = ServedModel(
                card, model, runner, placeholder, weights, stepper=stepper, scorer=scorer
            )
            self.metrics.model_memory.labels(card.name, "weights").set(weights)
            self.metrics.images.labels(card.name)  # every series exported at 0 from the start
            self.metrics.batch_size.labels(card.name)
            self.metrics.model_info.labels(card.name, card.family, card.kind, str(placeholder).lower()).set(1)
            log.info("model %s: %s family, %s, from %s", card.name, card.family, card.kind, path)
        self.default = next(iter(self.models))
        for m in self.models.values():
            ref = references.get(m.name)
            if ref is not None and ref not in self.models:
                raise ValueError(f"reference of {m.name!r}: {ref!r} is not served ({sorted(self.models)})")
            m.tiers = ladder(m.card, self.models[ref].card if ref else None)
        self._export_cost_series()
        for spec in (*references, *scorers):
            if spec not in self.models:
                raise ValueError(
                    f"--reference/--scorer name {spec!r}, which is not served ({sorted(self.models)})"
                )

    def _export_cost_series(self) -> None:
        """Every cost, acceptance and shadow series this server can move, at 0 from the start, so
        rates and ratios have data before the first event (as the other metrics do)."""
        mx = self.metrics
        for m in self.models.values():
            for i, t in enumerate(m.tiers):
                mx.tier_images.labels(t.model, t.name)
                mx.tier_compute.labels(t.model, t.name)
                if self.models[t.model].scorer is not None:
                    mx.scored_images.labels(t.model, t.name)
                    mx.accepted_images.labels(t.model, t.name)
                if i > 0:
                    mx.degraded.labels(m.name, t.name, m.tiers[i - 1].name)
                if t.name != "reference" and m.scorer is not None and m.tiers[-1].name == "reference":
                    for agree in ("true", "false"):
                        mx.shadow.labels(m.name, t.name, agree)
                    mx.shadow_gap.labels(m.name, t.name)
            for policy in ("resample", "escalate"):
                mx.rerolls.labels(m.name, policy)

    def get(self, name: str | None = None) -> ServedModel:
        return pick(self.models, self.default, name)

    async def acquire_text(self, model: str, prompt: str, w: float) -> tuple[int, bool, bool]:
        """A prompted model's text-table row for (prompt, w), encoded on the compute thread on
        a miss (which also serializes lookups) and pinned until `release_text`.
        -> (row, whether the prompt was truncated, whether it was a hit)"""
        table = self.get(model).model.conditions  # type: ignore[attr-defined]

        def lookup() -> tuple[int, bool, bool]:
            hits = table.hits
            row, cut = table.acquire(prompt, w)
            return row, cut, table.hits > hits

        return await asyncio.get_running_loop().run_in_executor(self.executor, lookup)

    def release_text(self, model: str, row: int) -> None:
        self.get(model).model.conditions.release(row)  # type: ignore[attr-defined]

    # the default model's parts, for callers that serve one model (benches, tests)
    @property
    def card(self) -> ModelInfo:
        return self.get().card

    @property
    def runner(self) -> SamplerRunner:
        return self.get().runner

    @property
    def model(self) -> ConsistencyModel:
        return self.get().model

    @property
    def placeholder(self) -> bool:
        return self.get().placeholder

    @property
    def supported_steps(self) -> list[int]:
        return self.card.steps

    def warmup(self) -> float:
        """Build, run (and on CUDA capture) every slot of every model on the compute thread;
        -> seconds. Each model's graphs get a pool of their own, so its memory can be told."""
        t0 = time.perf_counter()
        for m in self.models.values():
            before = reserved_bytes(self.device)
            if m.stepper is not None:
                self.call(m.stepper.warmup)
            else:
                self.call(m.runner.warmup, m.card.steps)
            m.graph_bytes = reserved_bytes(self.device) - before
            self.metrics.model_memory.labels(m.name, "graphs").set(m.graph_bytes)
        seconds = time.perf_counter() - t0
        self.metrics.capture_seconds.set(seconds)
        self.metrics.capture_memory.set(sum(m.graph_bytes for m in self.models.values()))
        return seconds

    def auto_max_batch(self, name: str | None = None, tolerance: float = 0.05) -> int:
        """The smallest bucket whose images/s is within `tolerance` of the best bucket's, timed
        here at the model's default step count. Why: a bigger batch makes everyone in it wait
        longer, so it is only worth it while it still buys throughput. On a GPU that is the largest
        bucket or near it; on a small CPU a middle bucket (the timings are logged at start-up and
        can be close enough to differ between start-ups: docs/performance.md). Times on the
        compute thread."""
        m = self.get(name)
        steps = m.card.steps_default
        # step mode: one evaluation per bucket (what a step-mode batch is)
        if m.stepper:
            secs = self.call(m.stepper.time_buckets)
        else:  # within ~10 s, and no bucket beyond a 10 % fall from the peak images/s
            secs = self.call(m.runner.time_buckets, steps, 3, 10.0, 0.10)
        rate = {b: b / s for b, s in secs.items()}
        best = max(rate.values())
        chosen = min(b for b, r in rate.items() if r >= (1 - tolerance) * best)
        log.info(
            "%s: max batch size %d (auto; images/s per bucket at %d steps: %s)",
            m.name,
            chosen,
            steps,
            ", ".join(f"{b}: {r:.1f}" for b, r in rate.items()),
        )
        return chosen

    def make_noise(
        self,
        steps: int,
        seeds: list[int],
        model: str | None = None,
        edits: list[RowEdit | None] | None = None,
    ) -> torch.Tensor:
        """-> [S, B, C, H, W]: image i's noise for every step from its own generator (for an
        interpolation frame, the slerp of its two seeds' noises)."""
        runner = self.get(model).runner
        shape = (runner.noise_slices(steps), *runner.noise_shape)

        def draw(seed: int) -> torch.Tensor:
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

        per_image = []
        for i, s in enumerate(seeds):
            e = edits[i] if edits else None
            if e is not None and e.mode == "interpolate":
                per_image.append(slerp(draw(s), draw(e.seed_b), e.alpha))
            else:
                per_image.append(draw(s))
        return torch.stack(per_image, dim=1)

    def sample(
        self,
        steps: int,
        labels: list[int | None],
        seeds: list[int],
        model: str | None = None,
        edits: list[RowEdit | None] | None = None,
    ) -> torch.Tensor:
        """-> x0 [B, C, H, W] fp32 in the model's data range (`value_range`). edits: one entry per
        image, None for plain generation (models/editing.py)."""
        return self.get(model).runner.run(steps, *self._inputs(steps, labels, seeds, model, edits))

    def run_batch(
        self,
        steps: int,
        labels: list[int | None],
        seeds: list[int],
        model: str | None = None,
        edits: list[RowEdit | None] | None = None,
    ) -> np.ndarray:
        """A served batch, as `sample` draws it: -> uint8 [B, H, W, C], quantized on the device.
        Where the model's scorer runs on the device, the batch is scored there too, and `score`
        hands those scores out for these images."""
        runner = self.get(model).runner
        asked = None if runner.scorer is None else asked_classes(labels)
        inputs = self._inputs(steps, labels, seeds, model, edits)
        images, finite, scores = runner.run_images(steps, *inputs, asked=asked)
        self._batch_scores = None if scores is None else (images, scores)
        if not finite.all():
            raise NonFiniteOutput("sampler output holds non-finite values")
        return images

    def _inputs(
        self,
        steps: int,
        labels: list[int | None],
        seeds: list[int],
        model: str | None,
        edits: list[RowEdit | None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, Constraint | None, torch.Tensor | None]:
        """The runner's inputs for a batch: (noise, labels, edit constraint, row times)."""
        card = self.get(model).card
        y = torch.tensor([card.pad_label if lab is None else lab for lab in labels], dtype=torch.long)
        noise = self.make_noise(steps, seeds, model, edits)
        constraint, times = batch_constraint(card, steps, edits) if edits else (None, None)
        return noise, y, constraint, times

    def score(self, model: str, images: np.ndarray, labels: list[int | None]) -> np.ndarray | None:
        """The accept check of `model` over a batch of its served images (uint8 [B, H, W, C]);
        None where it has no scorer. On the compute thread, right after the batch: the images
        `run_batch` just returned were scored in its graph, any others are scored here."""
        scorer = self.get(model).scorer
        if scorer is None:
            return None
        drawn = self._batch_scores
        if drawn is not None and drawn[0] is images:
            return drawn[1].astype(np.float64)
        return scorer(images, labels)

    # ---- step-level batching (server/step_runner.py) ---------------------------------------
    def step_rows(
        self,
        model: str,
        steps: int,
        labels: list[int | None],
        seeds: list[int],
        keys: list[Any],
        edits: list[RowEdit | None] | None = None,
    ) -> list[StepRow]:
        """A request's images as rows for the step runner: each its own noise (the request
        path's, so the images match) and schedule. On the compute thread (torch ops)."""
        m = self.get(model)
        noise = self.make_noise(steps, seeds, model, edits)
        sched = list(m.card.schedules[steps])
        constraint, times = batch_constraint(m.card, steps, edits) if edits else (None, None)
        evals = steps if m.card.kind == "consistency" else len(sched) - 1
        return [
            StepRow(
                key=keys[k],
                label=m.card.pad_label if lab is None else lab,
                noise=noise[:, k],
                times=sched if times is None else times[:, k].tolist(),
                evals=evals,
                constraint=None if constraint is None else constraint.rows(slice(k, k + 1)),
            )
            for k, lab in enumerate(labels)
        ]

    def step(self, model: str, joining: list[StepRow], drop: set[Any]) -> tuple[list[Finished], int]:
        """One evaluation of `model`'s rows in flight, `joining` admitted first and the rows in
        `drop` let go. -> (the rows it finished, rows evaluated)."""
        stepper = self.get(model).stepper
        assert stepper is not None, "not started with --batching step"
        if drop:
            stepper.drop(drop)
        return stepper.advance(joining)

    def clear_steps(self, model: str) -> None:
        """Forget every row in flight of `model` (after a failed evaluation)."""
        stepper = self.get(model).stepper
        if stepper is not None:
            stepper.clear()
