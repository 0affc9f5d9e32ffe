"""Bucketed sampler runner: static buffers per (bucket, steps), padded batches, graph replay.

Per (bucket, steps) the runner owns static buffers — noise for every step [S, b, C, H, W],
labels [b], times [S], the output [b, C, H, W] and its served form (uint8 pixels, per-row
finiteness and, with a device scorer, each row's accept-check score) — and zero-argument
functions that sample from them into the output: one for plain batches and, for consistency
models, one under the rows' edit constraints. On CUDA with backend 'graph' each is captured into
a CUDA graph and replayed; elsewhere they run eagerly. Padding, chunking and buffer copies are
the same code either way, so the CPU tests exercise exactly what the GPU runs.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from models.editing import Constraint
from models.grid import quantize
from models.interface import ConsistencyModel, ModelInfo
from models.sampler import consistency_sample, ode_sample
from models.scorers import DeviceScorer
from server.metrics import Metrics


class Replayable(Protocol):
    """A slot: the function one batch runs, and its captured graph (None: run it eagerly)."""

    graph: Any

    @property
    def fn(self) -> Callable[[], None]: ...


@dataclass
class Variant:
    """Another function over a slot's buffers, and its own captured graph."""

    fn: Callable[[], None]
    graph: Any = None


def prepare(slots: Sequence[Replayable], use_graphs: bool) -> None:
    """Run each slot once (lazy inits, Triton JIT), or on CUDA capture it into a graph, in the
    order given (largest bucket first, so the smaller graphs fit in the memory the largest one's
    pool already reserved)."""
    pool = None
    if use_graphs:
        from server import cuda_graphs

        pool = cuda_graphs.new_pool()
    for slot in slots:
        if use_graphs:
            slot.graph = cuda_graphs.capture(slot.fn, pool)
        else:
            slot.fn()


class WithVariant(Replayable, Protocol):
    """A slot whose buffers another function runs over too (the request and step runners')."""

    edited: Variant | None


def variants(slots: Iterable[WithVariant], use_graphs: bool) -> list[Replayable]:
    """What `prepare` takes of these slots: on CUDA every variant, each captured into its own
    graph; eagerly only the slots themselves, whose one run initialises all a variant shares
    with them (running the edited variants as well would only lengthen start-up)."""
    out: list[Replayable] = []
    for slot in slots:
        out.append(slot)
        if use_graphs and slot.edited is not None:
            out.append(slot.edited)
    return out


def replay(slot: Replayable) -> None:
    if slot.graph is not None:
        slot.graph.replay()
    else:
        slot.fn()


def reserved_bytes(device: torch.device) -> int:
    """Device memory the caching allocator holds (0 off CUDA): the engine reads it before and
    after a model's warm-up to tell what that model's graphs took."""
    if device.type != "cuda":
        return 0
    from server import cuda_graphs

    return cuda_graphs.reserved_bytes(device)


@dataclass
class Slot:
    bucket: int
    steps: int
    noise: torch.Tensor  # [S, bucket, C, H, W] fp32, S = noise_slices(steps)
    labels: torch.Tensor  # [bucket] int64
    times: torch.Tensor  # [S, bucket] per row (consistency) or [steps + 1] (ODE) fp32
    out: torch.Tensor  # [bucket, C, H, W] fp32
    images: torch.Tensor  # [bucket, H, W, C] uint8: out quantized
    finite: torch.Tensor  # [bucket] bool: every value of the row's out is finite
    fn: Callable[[], None]  # sampling with no row edited
    edit: Constraint | None = None  # per-row edit buffers (consistency models)
    edited: Variant | None = None  # sampling under the rows' edit constraints (with `edit`)
    asked: torch.Tensor | None = None  # [bucket] int64: each row's requested class or -1 (scorer)
    scores: torch.Tensor | None = None  # [bucket] fp32: the scorer's score of each row's images
    graph: Any = None
    dirty: bool = False  # edit buffers or row times hold a previous batch's edits

    def clean(self, schedule: torch.Tensor) -> None:
        """Every row back to plain sampling on the model's schedule [S]."""
        if self.edit is not None:
            for buf in self.edit.buffers():
                buf.zero_()
            self.times.copy_(schedule[:, None].expand_as(self.times))
        self.dirty = False


class SamplerRunner:
    def __init__(
        self,
        model: ConsistencyModel,
        card: ModelInfo,
        buckets: list[int],
        device: torch.device,
        *,
        use_graphs: bool = False,
        dtype: torch.dtype = torch.float32,
        metrics: Metrics | None = None,
        scorer: DeviceScorer | None = None,
    ) -> None:
        """scorer: an accept check to run over every batch's images where they are made (in the
        graph on a GPU); `run_images` then returns its scores."""
        self.model = model
        self.card = card
        self.buckets = sorted(buckets)
        self.device = device
        self.use_graphs = use_graphs
        self.dtype = dtype
        self.metrics = metrics or Metrics()
        self.image_shape = (card.channels, card.image_size, card.image_size)
        self.noise_shape = card.noise_shape  # the latent's, for a latent model
        # a latent model's images are its decoder's output of the sampled latents
        self.decode = getattr(model, "decode", None)
        self.pad_label = card.pad_label
        self.scorer = scorer
        self.slots: dict[tuple[int, int], Slot] = {}
        self.capture_s = 0.0
        for mode in ("graph", "eager"):  # every series exported at 0 from the start
            self.metrics.runner_runs.labels(card.name, mode)
        self.metrics.padded_rows.labels(card.name)
        self.metrics.computed_rows.labels(card.name)
        if dtype != torch.float32:
            # once, here: autocast inside a graph cannot cache its casts, so it would re-cast
            # every weight on every forward (1.6x slower at batch 1 for DiT-B/2 on an H100)
            model.cast_network(dtype)

    def noise_slices(self, steps: int) -> int:
        """Fresh noise per step for consistency sampling; the ODE needs only its start."""
        return steps if self.card.kind == "consistency" else 1

    def _make_slot(self, bucket: int, steps: int) -> Slot:
        S = self.noise_slices(steps)
        dev = self.device
        noise = torch.zeros((S, bucket, *self.noise_shape), device=dev)
        labels = torch.full((bucket,), self.pad_label, dtype=torch.long, device=dev)
        times = torch.tensor(self.card.schedules[steps], dtype=torch.float32, device=dev)
        out = torch.zeros((bucket, *self.image_shape), device=dev)
        c, h, w = self.image_shape
        images = torch.zeros((bucket, h, w, c), dtype=torch.uint8, device=dev)
        finite = torch.zeros((bucket,), dtype=torch.bool, device=dev)
        scorer = self.scorer
        asked = scores = None
        if scorer is not None:
            asked = torch.full((bucket,), -1, dtype=torch.long, device=dev)
            scores = torch.zeros((bucket,), dtype=torch.float32, device=dev)
        value_range = self.card.value_range
        model = self.model

        def serving(sample: Callable[[], torch.Tensor]) -> Callable[[], None]:
            @torch.inference_mode()
            def fn() -> None:
                out.copy_(sample())
                # the served form, made where the output is (in the graph on a GPU): the host
                # then copies a quarter of the bytes and runs no elementwise op of its own
                images.copy_(quantize(out, value_range))
                finite.copy_(torch.isfinite(out).flatten(1).all(1))
                if scorer is not None:  # the accept check, over the pixels as served
                    assert asked is not None and scores is not None
                    scores.copy_(scorer.score_tensor(images, asked))

            return fn

        if self.card.kind != "consistency":  # a TrigFlow teacher (the only diffusion kind a loader produces)
            velocity, sigma_d = model.ode_velocity, model.sigma_d  # type: ignore[attr-defined]
            fn = serving(lambda: ode_sample(velocity, noise[0], labels, times, sigma_d))
            return Slot(
                bucket, steps, noise, labels, times, out, images, finite, fn, asked=asked, scores=scores
            )

        # each row's own times and edit constraint, as data: the edited variant serves any mix of
        # plain and edit rows (models/editing.py); plain batches, most of them, run the variant
        # without the constraint's ops (some 20 small kernels per step for 28x28 images)
        times = times[:, None].repeat(1, bucket).contiguous()
        edit = Constraint.empty(bucket, self.noise_shape, dev)
        decode = self.decode or (lambda x: x)
        plain = serving(lambda: decode(consistency_sample(model, noise, labels, times)))
        edited = Variant(serving(lambda: decode(consistency_sample(model, noise, labels, times, edit))))
        return Slot(
            bucket, steps, noise, labels, times, out, images, finite, plain, edit, edited, asked, scores
        )

    def warmup(self, steps_list: list[int]) -> None:
        """Build every slot, run each once, and on CUDA capture it (largest bucket first)."""
        t0 = time.perf_counter()
        for steps in steps_list:
            for bucket in reversed(self.buckets):
                self.slots[(bucket, steps)] = self._make_slot(bucket, steps)
        prepare(variants(self.slots.values(), self.use_graphs), self.use_graphs)
        self.capture_s = time.perf_counter() - t0

    def time_buckets(
        self, steps: int, rounds: int = 3, budget_s: float = float("inf"), past_peak: float = 1.0
    ) -> dict[int, float]:
        """Seconds per batch for buckets at `steps` (after warm-up): the best of up to `rounds`
        rounds, each round timing every bucket once, so a burst of noise from other processes
        hits all buckets alike instead of making one look slow. So that a slow model (a 32-step
        teacher on a CPU) does not hold start-up for minutes: no round starts after `budget_s`,
        and the first round stops at a bucket whose images/s is `past_peak` below the best so
        far (larger, dearer buckets are past the peak too); later rounds time what it timed."""
        best: dict[int, float] = {}
        t_start = time.perf_counter()
        for r in range(rounds):
            if r and time.perf_counter() - t_start > budget_s:
                break
            for bucket in list(best) if r else self.buckets:
                slot = self.slots[(bucket, steps)]
                t0 = time.perf_counter()
                replay(slot)
                slot.out[:1].cpu()  # waits for the device
                best[bucket] = min(best.get(bucket, float("inf")), time.perf_counter() - t0)
                peak = max(b / s for b, s in best.items())
                if r == 0 and bucket / best[bucket] < (1 - past_peak) * peak:
                    break
        return best

    def bucket_for(self, n: int) -> int:
        """Smallest bucket holding n rows (n <= largest bucket)."""
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def _execute(self, run: Replayable) -> None:
        """A served batch: replay, counted in the runner metrics (timing runs are not)."""
        replay(run)
        self.metrics.runner_runs.labels(self.card.name, "eager" if run.graph is None else "graph").inc()

    def _schedule(self, steps: int) -> torch.Tensor:
        return torch.tensor(self.card.schedules[steps], dtype=torch.float32, device=self.device)

    def _load_edits(
        self, slot: Slot, start: int, n: int, edit: Constraint | None, times: torch.Tensor | None
    ) -> None:
        """Rows start..start+n of the batch's edits and times into the slot's buffers."""
        if slot.edit is None:
            raise ValueError(f"model {self.card.name!r} ({self.card.kind}) cannot edit")
        if slot.dirty:
            slot.clean(self._schedule(slot.steps))
        slot.dirty = True
        rows = slice(start, start + n)
        if times is not None:
            slot.times[:, :n].copy_(times[:, rows], non_blocking=True)
        if edit is not None:
            for buf, src in zip(slot.edit.buffers(), edit.rows(rows).buffers()):
                buf[:n].copy_(src, non_blocking=True)

    def run(
        self,
        steps: int,
        noise: torch.Tensor,
        labels: torch.Tensor,
        edit: Constraint | None = None,
        times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise: [S, B, C, H, W] fp32 (CPU); labels: [B] int64 -> x0: [B, C, H, W] fp32 on the CPU.
        edit: the rows' constraints (CPU, [B, ...]); times: [S, B] the rows' own times; both
        None for plain sampling."""
        out = torch.empty((labels.shape[0], *self.image_shape), dtype=torch.float32)
        for slot, start, n in self._chunks(steps, noise, labels, edit, times, None):
            out[start : start + n].copy_(slot.out[:n])  # device -> host; synchronizes
        return out

    def run_images(
        self,
        steps: int,
        noise: torch.Tensor,
        labels: torch.Tensor,
        edit: Constraint | None = None,
        times: torch.Tensor | None = None,
        asked: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What a served batch needs, as `run` takes it: -> (uint8 [B, H, W, C], bool [B]: the
        row's output was finite everywhere, float32 [B]: each image's accept-check score),
        quantized and scored on the device. asked: int64 [B], each image's requested class or
        -1, for the runner's scorer; without it (or a scorer) the scores are None."""
        c, h, w = self.image_shape
        B = labels.shape[0]
        if asked is not None and self.scorer is None:
            raise ValueError("this runner has no scorer to score the images with")
        images = torch.empty((B, h, w, c), dtype=torch.uint8)
        finite = torch.empty((B,), dtype=torch.bool)
        scores = torch.empty((B,), dtype=torch.float32) if asked is not None else None
        for slot, start, n in self._chunks(steps, noise, labels, edit, times, asked):
            images[start : start + n].copy_(slot.images[:n])  # device -> host; synchronizes
            finite[start : start + n].copy_(slot.finite[:n])
            if scores is not None:
                assert slot.scores is not None
                scores[start : start + n].copy_(slot.scores[:n])
        return images.numpy(), finite.numpy(), None if scores is None else scores.numpy()

    def _chunks(
        self,
        steps: int,
        noise: torch.Tensor,
        labels: torch.Tensor,
        edit: Constraint | None,
        times: torch.Tensor | None,
        asked: torch.Tensor | None,
    ) -> Iterator[tuple[Slot, int, int]]:
        """Load and run each chunk of rows; -> (its slot, first row, rows) once it has run, for
        the caller to copy out before the next chunk reuses the slot.

        Rows run in chunks of at most the largest bucket, each padded up to its bucket; padding
        rows get `pad_label` and whatever noise (and edit data) the buffers held (rows are
        independent).
        """
        B = labels.shape[0]
        if self.device.type == "cuda":
            # page-locked for the async copies; pin_memory() draws on torch's caching host
            # allocator, so this costs a copy, not an allocation. (Slot-owned pinned staging
            # buffers were tried and measured no faster on an H100: docs/performance.md.)
            noise, labels = noise.pin_memory(), labels.pin_memory()
            asked = None if asked is None else asked.pin_memory()
        top = self.buckets[-1]
        for start in range(0, B, top):
            n = min(top, B - start)
            slot = self.slots[(self.bucket_for(n), steps)]
            slot.noise[:, :n].copy_(noise[:, start : start + n], non_blocking=True)
            slot.labels[:n].copy_(labels[start : start + n], non_blocking=True)
            if n < slot.bucket:
                slot.labels[n:].fill_(self.pad_label)
            if asked is not None and slot.asked is not None:
                # padding rows keep whatever valid class they held: their scores are not read
                slot.asked[:n].copy_(asked[start : start + n], non_blocking=True)
            run: Replayable = slot
            if edit is None and times is None:
                if slot.dirty:
                    slot.clean(self._schedule(steps))
            else:
                self._load_edits(slot, start, n, edit, times)
                assert slot.edited is not None  # _load_edits refuses a slot without edits
                run = slot.edited
            self._execute(run)
            self.metrics.padded_rows.labels(self.card.name).inc(slot.bucket - n)
            self.metrics.computed_rows.labels(self.card.name).inc(slot.bucket)
            yield slot, start, n
