"""Step-level (continuous) batching: requests join and leave at every network evaluation.

The queue, its bound, deadlines before admission, disconnects, drain and stop are the request
batcher's (it is the base class). What differs is the loop: each turn admits waiting requests'
images as rows while the model has room (a request may be admitted over several turns), runs
one evaluation of that model's rows in flight on the compute thread, and answers the requests
whose last image finished. Different models (a consistency model and its 32-step teacher) take
turns evaluation by evaluation, round-robin among those with work, so a long request never holds
the compute thread while short ones wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.batcher import Batcher, BatchFailed, Job, JobResult, ScoreFn
from server.metrics import Metrics

log = logging.getLogger("cmserve.step_batcher")

# (model, steps, labels, seeds, keys, edits) -> rows; (model, joining rows, keys to drop) ->
# (finished rows, rows evaluated); (model) -> None: forget every row in flight. All run on the
# compute thread (server/engine.py: step_rows, step, clear_steps).
RowsFn = Callable[..., list[Any]]
StepFn = Callable[[str, list[Any], set[Any]], tuple[list[Any], int]]
ClearFn = Callable[[str], None]


@dataclass(eq=False)
class _Flight:
    """A request some of whose images are in flight."""

    job: Job
    admitted: int = 0
    done: int = 0
    images: np.ndarray | None = None
    scores: np.ndarray | None = None
    started: float = field(default_factory=time.monotonic)
    widest: int = 0  # most rows an evaluation of it shared


class StepBatcher(Batcher):
    def __init__(
        self,
        rows_fn: RowsFn,
        step_fn: StepFn,
        clear_fn: ClearFn,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_queue_images: int,
        model_max_batch: dict[str, int] | None = None,
        executor: Executor | None = None,
        tenant_share: float = 1.0,
        batch_share: float = 1.0,
        score_fn: ScoreFn | None = None,
        background_share: float = 0.05,
    ) -> None:
        super().__init__(
            lambda *a: np.empty(0),  # unused: the step loop below replaces the batch dispatch
            metrics,
            max_batch_size=max_batch_size,
            max_queue_images=max_queue_images,
            model_max_batch=model_max_batch,
            executor=executor,
            tenant_share=tenant_share,
            batch_share=batch_share,
            score_fn=score_fn,
            background_share=background_share,
        )
        self._eval_s: dict[str, float] = {}  # EWMA of one evaluation's wall time per model
        self.rows_fn, self.step_fn, self.clear_fn = rows_fn, step_fn, clear_fn
        self._flights: dict[Job, _Flight] = {}
        self._in_flight: dict[str, int] = {}  # rows in flight per model
        self._last_model = ""

    # ---- scheduling ----------------------------------------------------------------------------
    def _models_with_work(self) -> list[str]:
        return sorted({j.model for j in self._pending} | {m for m, n in self._in_flight.items() if n})

    def _next_model(self) -> str:
        """Round-robin over the models with work, one evaluation each."""
        models = self._models_with_work()
        later = [m for m in models if m > self._last_model]
        return (later or models)[0]

    def _admit(self, model: str) -> list[tuple[Job, int, int]]:
        """(job, first image, count) of the waiting images of `model` that fit, oldest first."""
        room = self.limit(model) - self._in_flight.get(model, 0)
        out = []
        for job in self._waiting():
            if room <= 0:
                break
            if job.model != model:
                continue
            fl = self._flights.setdefault(job, _Flight(job))
            k = min(room, job.n - fl.admitted)
            out.append((job, fl.admitted, k))
            if fl.admitted == 0:
                self.metrics.queue_wait.observe(time.monotonic() - job.enqueued)
            fl.admitted += k
            room -= k
            if fl.admitted == job.n:  # all of it in flight: out of the queue
                self._drop(job)
        self._update_gauges()
        return out

    def _abandoned(self, model: str) -> set[Any]:
        """Row keys of `model`'s requests in flight that nobody waits for (client gone, deadline
        answered by the route): they leave at this evaluation."""
        gone = [
            f
            for f in self._flights.values()
            if f.job.model == model and (f.job.future.done() or f.job.client_gone)
        ]
        keys: set[Any] = set()
        for f in gone:
            if f.job.client_gone and not f.job.future.done():
                self.metrics.rejected.labels("disconnected").inc()
                f.job.future.cancel()
            keys |= {(f.job, i) for i in range(f.admitted)}
            self._forget(f)
        return keys

    def _forget(self, f: _Flight) -> None:
        self._flights.pop(f.job, None)
        if f.job in self._pending:
            self._drop(f.job)
        self._in_flight[f.job.model] = self._in_flight.get(f.job.model, 0) - (f.admitted - f.done)

    def predict_s(self, model: str, steps: int) -> float:
        """Evaluations ahead (the interactive images waiting, a bucket at a time) and its own
        `steps`, at this model's recent time per evaluation."""
        ahead = sum(j.n for j in self._pending if j.priority != "batch")
        per_eval = self._eval_s.get(model, self._batch_s)
        return (ahead / self.limit(model) + steps) * per_eval

    def _evaluate(
        self, model: str, admit: list[tuple[Job, int, int]], drop: set[Any]
    ) -> tuple[list[Any], int, np.ndarray | None]:
        """On the compute thread: the joining rows, one evaluation, then the accept check of
        the rows it finished (scores in their order)."""
        rows = []
        for job, start, k in admit:
            sl = slice(start, start + k)
            edits = job.edits[sl] if job.edits else None
            keys = [(job, i) for i in range(start, start + k)]
            rows += self.rows_fn(model, job.steps, job.labels[sl], job.seeds[sl], keys, edits)
        finished, n = self.step_fn(model, rows, drop)
        scores = None
        done = [r for r in finished if r.finite]
        if self.score_fn is not None and done:
            images = np.stack([r.image for r in done])
            scores = self.score_fn(model, images, [job.labels[i] for job, i in (r.key for r in done)])
        return finished, n, scores

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not any(self._in_flight.values()):
                self._running = []
                self._idle.set()
                if await self._idle_background():
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._idle.clear()
            self._prune()
            if not self._pending and not any(self._in_flight.values()):
                continue
            model = self._last_model = self._next_model()
            drop = self._abandoned(model)
            admit = self._admit(model)
            self._in_flight[model] = self._in_flight.get(model, 0) + sum(k for _, _, k in admit)
            self._running = [f.job for f in self._flights.values()]
            t0 = time.monotonic()
            try:
                finished, n, scores = await loop.run_in_executor(
                    self._executor, self._evaluate, model, admit, drop
                )
            except Exception as e:  # the evaluation fails every request in flight on this model
                self._fail(model, e)
                continue
            finally:
                elapsed = time.monotonic() - t0
                self._batch_s = 0.8 * self._batch_s + 0.2 * elapsed
                self._eval_s[model] = 0.8 * self._eval_s.get(model, elapsed) + 0.2 * elapsed
                self.batches_run += 1
            self.metrics.batch_size.labels(model).observe(n)
            self.metrics.batch_compute.labels(model, "step").observe(elapsed)
            self._finish(model, finished, n, scores)

    def _finish(self, model: str, finished: list[Any], n: int, scores: np.ndarray | None = None) -> None:
        for f in self._flights.values():
            if f.job.model == model:
                f.widest = max(f.widest, n)
        scored = iter(scores) if scores is not None else None  # one per finite row, in order
        for row in finished:
            job, i = row.key
            score = next(scored) if scored is not None and row.finite else None
            flight = self._flights.get(job)
            if flight is None:  # let go while this evaluation ran
                continue
            f = flight
            f.done += 1
            self._in_flight[model] -= 1
            if not row.finite:  # its rows still in flight leave at the next evaluation (_abandoned)
                log.error("%s: image %d of request %s came out non-finite", model, i, job.request_id)
                self.metrics.batch_failures.labels("nonfinite").inc()
                if not job.future.done():
                    job.future.set_exception(BatchFailed("nonfinite", [job.request_id]))
                continue
            if f.images is None:
                f.images = np.empty((job.n, *row.image.shape), dtype=np.uint8)
            f.images[i] = row.image
            if score is not None:
                if f.scores is None:
                    f.scores = np.zeros(job.n)
                f.scores[i] = score
            if f.done == job.n:
                self._flights.pop(job)
                if not job.future.done():
                    now = time.monotonic()
                    job.future.set_result(
                        JobResult(f.images, f.started - job.enqueued, now - f.started, f.widest, f.scores)
                    )

    def _fail(self, model: str, e: Exception) -> None:
        reason = getattr(e, "reason", "exception")
        failed = [f for f in self._flights.values() if f.job.model == model and f.admitted]
        ids = [f.job.request_id for f in failed]
        log.error("evaluation of %s failed: %s: %s; requests %s", model, type(e).__name__, e, ids)
        self.metrics.batch_failures.labels(reason).inc()
        for f in failed:
            self._forget(f)
            if not f.job.future.done():
                f.job.future.set_exception(BatchFailed(reason, ids))
        self._in_flight[model] = 0
        self.clear_fn(model)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "rows_in_flight": dict(self._in_flight)}
