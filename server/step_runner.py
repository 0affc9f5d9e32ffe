"""Step-level (continuous) batching for one model: every call advances each row in flight by one
network evaluation of its own schedule; finished rows leave and new rows join at the next call.

Buffers are per model, `capacity` rows each (the largest bucket): each row's state (the last x0
estimate, or the ODE's x), its noise for the step at hand, its time (and next time, for the ODE),
whether it is on its first step, its label and its edit constraint. Rows in flight are kept
compact in rows 0..n-1 (a finished row's place is taken by the last row), and one evaluation
runs the smallest bucket b >= n over rows 0..b-1: one CUDA graph per bucket, whatever the mix
of step counts, schedules and step indices, because all of it is data.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.editing import Constraint
from models.grid import quantize
from models.interface import ConsistencyModel, ModelInfo
from models.sampler import consistency_step, ode_step
from server.metrics import Metrics
from server.runner import Replayable, Variant, prepare, replay, variants


@dataclass
class StepRow:
    """One image in flight. noise: [S, C, H, W] (CPU); times: its schedule (S times, or the ODE's
    steps + 1 ending at 0)."""

    key: Any  # the caller's handle, returned with the image
    label: int
    noise: torch.Tensor
    times: list[float]
    evals: int  # network evaluations it needs: its step count
    constraint: Constraint | None = None  # its edit, as a 1-row Constraint (None: plain)
    i: int = 0  # the step it is on
    pos: int = -1  # its row in the buffers


@dataclass
class StepSlot:
    bucket: int
    fn: Callable[[], None]  # an evaluation with no row in flight edited
    edited: Variant | None = None  # one under the rows' edit constraints (consistency models)
    graph: Any = None


@dataclass
class Finished:
    key: Any
    image: np.ndarray  # uint8 [H, W, C]
    finite: bool  # False: the sampler's output held NaN or inf (the image is not served)


class StepRunner:
    def __init__(
        self,
        model: ConsistencyModel,
        card: ModelInfo,
        buckets: list[int],
        device: torch.device,
        *,
        use_graphs: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.model, self.card, self.device = model, card, device
        self.buckets = sorted(buckets)
        self.capacity = self.buckets[-1]
        self.use_graphs = use_graphs
        self.metrics = metrics or Metrics()
        self.ode = card.kind != "consistency"
        # rows hold what the sampler draws: the latent, for a latent model (decoded as a row
        # finishes), else the image itself
        shape = card.noise_shape
        self.row_shape = shape
        self.decode = getattr(model, "decode", None)
        cap, dev = self.capacity, device
        self.state = torch.zeros((cap, *shape), device=dev)
        self.z = torch.zeros((cap, *shape), device=dev)
        self.t = torch.ones((cap,), device=dev)
        self.s = torch.zeros((cap,), device=dev)
        self.first = torch.ones((cap,), dtype=torch.bool, device=dev)
        self.labels = torch.full((cap,), card.pad_label, dtype=torch.long, device=dev)
        self.edit = Constraint.empty(cap, shape, dev)
        self.out = torch.zeros((cap, *shape), device=dev)
        self.rows: list[StepRow] = []
        self.slots: dict[int, StepSlot] = {}
        self.capture_s = 0.0

    def _make_slot(self, b: int) -> StepSlot:
        model, ode = self.model, self.ode
        state, z, t, s, first, labels, out = (
            self.state[:b], self.z[:b], self.t[:b], self.s[:b], self.first[:b], self.labels[:b], self.out[:b]
        )  # fmt: skip

        def evaluation(edit: Constraint | None) -> Callable[[], None]:
            @torch.inference_mode()
            def fn() -> None:
                if ode:
                    velocity, sigma_d = model.ode_velocity, model.sigma_d  # type: ignore[attr-defined]
                    out.copy_(ode_step(velocity, state, z, t, s, first, labels, sigma_d))
                else:
                    out.copy_(consistency_step(model, state, z, t, first, labels, edit))
                state.copy_(out)

            return fn

        # as the request runner's slots: evaluations with no edited row in flight skip the
        # constraints' ops
        edited = None if ode else Variant(evaluation(self.edit.rows(slice(0, b))))
        return StepSlot(b, evaluation(None), edited)

    def warmup(self) -> None:
        """Build every bucket's evaluation, run it once, and on CUDA capture it (largest first)."""
        t0 = time.perf_counter()
        self.slots = {b: self._make_slot(b) for b in reversed(self.buckets)}
        prepare(variants(self.slots.values(), self.use_graphs), self.use_graphs)
        self.capture_s = time.perf_counter() - t0

    def time_buckets(self, rounds: int = 3) -> dict[int, float]:
        """Seconds per evaluation of each bucket (the best of `rounds`)."""
        best = {b: float("inf") for b in self.buckets}
        for _ in range(rounds):
            for b in self.buckets:
                t0 = time.perf_counter()
                replay(self.slots[b])
                self.out[:1].cpu()
                best[b] = min(best[b], time.perf_counter() - t0)
        return best

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def _place(self, joining: list[StepRow]) -> None:
        """Give joining rows the places after the rows in flight, and write their per-row
        constants (labels, constraints) there: one host->device copy per buffer."""
        start, k = len(self.rows), len(joining)
        for j, row in enumerate(joining):
            row.pos = start + j
        place = slice(start, start + k)
        self.labels[place].copy_(torch.tensor([r.label for r in joining]), non_blocking=True)
        if all(r.constraint is None for r in joining):
            for buf in self.edit.buffers():
                buf[place].zero_()
            return
        empty = Constraint.empty(1, self.row_shape)
        rows = [(r.constraint or empty).buffers() for r in joining]
        for f, buf in enumerate(self.edit.buffers()):
            buf[place].copy_(torch.cat([r[f] for r in rows]), non_blocking=True)

    def _move(self, src: int, dst: int) -> None:
        """Row `src`'s buffers into row `dst` (compaction)."""
        for buf in (self.state, self.labels, *self.edit.buffers()):
            buf[dst].copy_(buf[src])

    def _remove(self, row: StepRow) -> None:
        last = self.rows[-1]
        if last is not row:
            self._move(last.pos, row.pos)
            last.pos = row.pos
            self.rows[row.pos] = last
        self.rows.pop()

    def drop(self, keys: set[Any]) -> None:
        """Rows whose result nobody waits for any more leave without finishing."""
        for row in [r for r in self.rows if r.key in keys]:
            self._remove(row)

    def clear(self) -> None:
        self.rows.clear()

    def advance(self, joining: list[StepRow]) -> tuple[list[Finished], int]:
        """Admit `joining` (at most `free` rows), run one evaluation over every row in flight,
        -> (the rows that finished with it, rows evaluated)."""
        if len(joining) > self.free:
            raise ValueError(f"{len(joining)} rows joining, {self.free} free")
        if joining:
            self._place(joining)
            self.rows += joining
        n = len(self.rows)
        if n == 0:
            return [], 0
        # this step's noise and times of every row, in one host->device copy each
        z = torch.stack([r.noise[0 if self.ode else r.i] for r in self.rows])
        self.z[:n].copy_(z, non_blocking=True)
        self.t[:n].copy_(torch.tensor([r.times[r.i] for r in self.rows]), non_blocking=True)
        if self.ode:
            self.s[:n].copy_(torch.tensor([r.times[r.i + 1] for r in self.rows]), non_blocking=True)
        self.first[:n].copy_(torch.tensor([r.i == 0 for r in self.rows]), non_blocking=True)
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        run: Replayable = self.slots[b]
        if any(r.constraint is not None for r in self.rows):
            run = self.slots[b].edited or run
        replay(run)
        mode = "eager" if run.graph is None else "graph"
        self.metrics.runner_runs.labels(self.card.name, mode).inc()
        self.metrics.padded_rows.labels(self.card.name).inc(b - n)
        self.metrics.computed_rows.labels(self.card.name).inc(b)
        done = [r for r in self.rows if r.i + 1 == r.evals]
        finished = []
        if done:
            x = self.out[torch.tensor([r.pos for r in done], device=self.device)]
            if self.decode is not None:  # eager, over the rows that finished: k varies per call
                with torch.inference_mode():
                    x = self.decode(x)
            x = x.float()  # quantized where it is (the request path's runner does the same)
            images = quantize(x, self.card.value_range).cpu().numpy()
            finite = torch.isfinite(x).flatten(1).all(1).tolist()
            finished = [Finished(r.key, images[k], finite[k]) for k, r in enumerate(done)]
        for r in self.rows:
            r.i += 1
        for r in done:
            self._remove(r)
        return finished, n
