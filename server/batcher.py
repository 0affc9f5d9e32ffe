"""Async dynamic batcher: one queue, one future per request, one batch computing at a time.

- Idle worker + waiting requests -> dispatch at once (no fixed wait at low load); while a batch
  computes, requests accumulate and the next batch takes up to `max_batch_size` images, oldest
  first. A request is never split across batches (a request larger than `max_batch_size` runs
  alone and the runner chunks it). `max_wait_s` optionally holds a partial batch for company.
- A batch holds one model and one step count: the oldest request picks them, later requests
  for another model or count wait.
- Queued requests whose deadline passed get `DeadlineExceeded`, those whose client left are
  dropped, both before any compute is spent on them.
- The sampler runs on the engine's compute thread (or a private one), so the event loop keeps
  answering while a batch runs.
- A batch that raises fails only its own requests (`BatchFailed`); the loop carries on.
- Priority: `batch` jobs run only while no `interactive` job waits, and are refused (429) once
  the queue holds `batch_share` of its bound. Background tasks (shadow sampling) run one slice
  at a time, only while no job waits at all, and within `background_share` of the compute
  thread's time: a job that arrives during a slice waits for it, so slices must stay rare
  where one costs as much as a batch (a CPU).
- `score_fn` (the accept check) runs on the compute thread right after each batch, over it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from server.metrics import Metrics

log = logging.getLogger("cmserve.batcher")

# (steps, labels per image, seeds per image, model name, edits per image or None) -> uint8 images
# [B, H, W, C]; runs on the worker thread.
RunBatch = Callable[[int, list[int | None], list[int], str, list[Any] | None], np.ndarray]
# (model name, uint8 images [B, H, W, C], labels) -> scores [B] in [0, 1], or None (no scorer)
ScoreFn = Callable[[str, np.ndarray, list[int | None]], np.ndarray | None]
# One slice of background work on the compute thread -> True once the task is finished.
Background = Callable[[], bool]
PRIORITIES = ("interactive", "batch")
BACKGROUND_WINDOW_S = 10.0  # the window over which background work keeps to its share


class QueueFull(Exception):
    def __init__(self, retry_after_s: int, reason: str = "queue_full") -> None:
        super().__init__("queue full")
        self.retry_after_s = retry_after_s
        self.reason = reason  # "queue_full", or "key_queue_share": this key's share of it is


class DeadlineExceeded(Exception):
    pass


class Draining(Exception):
    pass


class BatchFailed(Exception):
    def __init__(self, reason: str, request_ids: list[str]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_ids = request_ids


@dataclass(eq=False)
class Job:
    steps: int
    labels: list[int | None]  # one per image
    seeds: list[int]  # one per image
    deadline: float  # time.monotonic() after which the job must not start
    request_id: str
    future: asyncio.Future[JobResult]
    model: str = ""  # the served model's name ("" where the batcher serves one model)
    tenant: str = ""  # whose queue share it counts against (the API key)
    edits: list[Any] | None = None  # one per image (models.editing.RowEdit), None = plain generation
    priority: str = "interactive"  # one of PRIORITIES
    enqueued: float = field(default_factory=time.monotonic)
    client_gone: bool = False

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple[str, int]:
        """What jobs must share to share a batch."""
        return self.model, self.steps


@dataclass
class JobResult:
    images: np.ndarray  # uint8 [n, H, W, C]
    queue_s: float
    compute_s: float
    batch_images: int
    scores: np.ndarray | None = None  # [n] accept-check scores, None where the model has no scorer


class JobQueue(Protocol):
    """What the HTTP front end asks of the queue: a `Batcher` in the engine's own process, a
    `server.remote.RemoteBatcher` in a front-end process of its own."""

    def submit(self, job: Job) -> None: ...
    def abandon(self, job: Job) -> None: ...
    def predict_s(self, model: str, steps: int) -> float: ...
    async def drain(self, timeout_s: float) -> bool: ...
    async def stop(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_queue_images: int,
        model_max_batch: dict[str, int] | None = None,
        max_wait_s: float = 0.0,
        executor: Executor | None = None,
        tenant_share: float = 1.0,
        batch_share: float = 1.0,
        score_fn: ScoreFn | None = None,
        max_background: int = 64,
        background_share: float = 0.05,
    ) -> None:
        self.run_batch = run_batch
        self.score_fn = score_fn
        # most images priority=batch jobs may fill the queue with
        self.batch_limit = max(1, math.floor(batch_share * max_queue_images))
        self._background: deque[Background] = deque()
        self.max_background = max_background
        self.background_share = background_share
        self._slices: deque[tuple[float, float]] = deque()  # (end, seconds) of recent slices
        # most images one tenant may have queued (1.0: no cap beyond the queue's own)
        self.tenant_limit = max(1, math.floor(tenant_share * max_queue_images))
        self._tenant_images: dict[str, int] = {}
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.model_max_batch = model_max_batch or {}  # per model, where it differs
        self.max_queue_images = max_queue_images
        self.max_wait_s = max_wait_s
        self._pending: deque[Job] = deque()
        self._queued_images = 0
        self._running: list[Job] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # one thread: batches run one at a time; a given executor (the engine's) is not ours to stop
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="cmserve-batcher")
        self._task: asyncio.Task[None] | None = None
        self._batch_s = 0.05  # EWMA of batch wall time, for Retry-After
        self._key_s: dict[tuple[str, int], float] = {}  # EWMA of batch wall time per (model, steps)
        self.batches_run = 0
        metrics.queue_limit.set(max_queue_images)

    # ---- producer side ------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job or raise QueueFull (never blocks): the queue is full, or this job's tenant
        already holds its share of it (then Retry-After is from its own images queued)."""
        if self._queued_images + job.n > self.max_queue_images:
            raise QueueFull(self.retry_after())
        if job.priority == "batch" and self._queued_images + job.n > self.batch_limit:
            raise QueueFull(self.retry_after(), reason="batch_queue_share")
        held = self._tenant_images.get(job.tenant, 0)
        if job.tenant and held + job.n > self.tenant_limit:
            raise QueueFull(self.retry_after(held), reason="key_queue_share")
        self._pending.append(job)
        self._queued_images += job.n
        self._tenant_images[job.tenant] = held + job.n
        self._idle.clear()
        self._update_gauges()
        self._wakeup.set()

    def abandon(self, job: Job) -> None:
        """The job's client left: it is dropped before compute (its future cancelled)."""
        job.client_gone = True

    def retry_after(self, images: int | None = None) -> int:
        """Seconds until the queue (or `images` of it) has likely drained: batches ahead of us x
        recent batch time."""
        queued = self._queued_images if images is None else images
        batches = math.ceil((queued + 1) / self.max_batch_size) + 1
        return max(1, math.ceil(batches * self._batch_s))

    def predict_s(self, model: str, steps: int) -> float:
        """Seconds a request for (model, steps) queued now would likely take to answer: the
        interactive batches ahead of it, then its own (recent batch times)."""
        ahead = sum(j.n for j in self._pending if j.priority != "batch")
        own = self._key_s.get((model, steps), self._batch_s)
        return math.ceil(ahead / self.limit(model)) * self._batch_s + own

    def submit_background(self, task: Background) -> bool:
        """Queue background work (run a slice at a time while no job waits); False when
        `max_background` tasks already wait (the task is dropped)."""
        if len(self._background) >= self.max_background:
            return False
        self._background.append(task)
        self._wakeup.set()
        return True

    def _background_wait(self) -> float:
        """Seconds until background work may take another slice: 0 while the slices of the last
        `BACKGROUND_WINDOW_S` took under `background_share` of it."""
        now = time.monotonic()
        while self._slices and self._slices[0][0] < now - BACKGROUND_WINDOW_S:
            self._slices.popleft()
        over = sum(s for _, s in self._slices) - self.background_share * BACKGROUND_WINDOW_S
        if over < 0:
            return 0.0
        # wait until enough of the oldest slices have left the window
        left = over
        for end, s in self._slices:
            left -= s
            if left < 0:
                return max(1e-3, end + BACKGROUND_WINDOW_S - now)
        return BACKGROUND_WINDOW_S

    async def _idle_background(self) -> bool:
        """With no job waiting: run one background slice, or wait for a job (or the share to
        allow the next slice). -> False when there is no background work (wait for a job)."""
        if not self._background:
            return False
        wait = self._background_wait()
        if wait > 0:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)
            return True
        task = self._background.popleft()
        t0 = time.monotonic()
        try:
            done = await asyncio.get_running_loop().run_in_executor(self._executor, task)
        except Exception:
            log.exception("background task failed; dropped")
            return True
        finally:
            t1 = time.monotonic()
            self._slices.append((t1, t1 - t0))
        if not done:
            self._background.appendleft(task)
        return True

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cmserve-batcher")

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        """Stop the loop; whatever is still queued, and a batch still in flight, gets `Draining`
        (every request one answer)."""
        in_flight = list(self._running)  # the loop's `finally` forgets them when cancelled
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            in_flight.append(self._pending.popleft())
        for job in in_flight:
            if not job.future.done():
                job.future.set_exception(Draining())
        self._background.clear()
        self._queued_images = 0
        self._tenant_images.clear()
        self._update_gauges()
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # ---- consumer side ------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        self.metrics.queue_images.set(self._queued_images)
        self.metrics.queue_requests.set(len(self._pending))

    def _drop(self, job: Job) -> None:
        self._pending.remove(job)
        self._queued_images -= job.n
        left = self._tenant_images.get(job.tenant, 0) - job.n
        if left > 0:
            self._tenant_images[job.tenant] = left
        else:
            self._tenant_images.pop(job.tenant, None)

    def _prune(self) -> None:
        """Drop jobs that must not reach the model: answered, abandoned or expired."""
        now = time.monotonic()
        for job in list(self._pending):
            if job.future.done():  # the route gave up (its own timeout)
                self._drop(job)
            elif job.client_gone:
                self._drop(job)
                self.metrics.rejected.labels("disconnected").inc()
                job.future.cancel()
            elif now > job.deadline:
                self._drop(job)
                self.metrics.rejected.labels("deadline").inc()
                job.future.set_exception(DeadlineExceeded())
        self._update_gauges()

    def limit(self, model: str) -> int:
        return self.model_max_batch.get(model, self.max_batch_size)

    def _waiting(self) -> list[Job]:
        """The jobs that may run next, oldest first: the interactive ones, or, when none waits,
        the batch-priority ones."""
        interactive = [j for j in self._pending if j.priority != "batch"]
        return interactive or list(self._pending)

    def _select(self) -> list[Job]:
        """Oldest job's model and step count; then later jobs of those, in order, while they fit."""
        waiting = self._waiting()
        first = waiting[0]
        batch, images, limit = [first], first.n, self.limit(first.model)
        for job in waiting[1:]:
            if job.key != first.key:
                continue
            if images + job.n > limit:
                break
            batch.append(job)
            images += job.n
        return batch

    def _fill_wait(self) -> float:
        """Seconds to hold a partial batch for company (`max_wait_s` from its oldest job), 0 once
        the next batch is full or its wait is over."""
        waiting = self._waiting()
        first = waiting[0]
        if sum(j.n for j in waiting if j.key == first.key) >= self.limit(first.model):
            return 0.0
        return first.enqueued + self.max_wait_s - time.monotonic()

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                if await self._idle_background():
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._prune()
            if not self._pending:
                continue
            if self.max_wait_s > 0 and (left := self._fill_wait()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
                continue
            batch = self._select()
            for job in batch:
                self._drop(job)
            self._update_gauges()
            await self._dispatch(batch)

    async def _dispatch(self, batch: list[Job]) -> None:
        model, steps = batch[0].key
        labels = [lab for job in batch for lab in job.labels]
        seeds = [s for job in batch for s in job.seeds]
        edits = None  # plain batches carry none; a batch with an edit carries one per image
        if any(job.edits for job in batch):
            edits = [e for job in batch for e in (job.edits or [None] * job.n)]
        started = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.observe(started - job.enqueued)
        self.metrics.batch_size.labels(model).observe(len(seeds))
        self._running = batch
        loop = asyncio.get_running_loop()
        try:
            images, scores = await loop.run_in_executor(
                self._executor, self._run_and_score, steps, labels, seeds, model, edits
            )
        except Exception as e:  # one bad batch fails its own requests only
            reason = getattr(e, "reason", "exception")
            ids = [j.request_id for j in batch]
            log.error(
                "batch of %d images (model=%s, steps=%d) failed: %s: %s; requests %s",
                len(seeds),
                model,
                steps,
                type(e).__name__,
                e,
                ids,
            )
            self.metrics.batch_failures.labels(reason).inc()
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(BatchFailed(reason, ids))
        else:
            compute_s = time.monotonic() - started
            self.metrics.batch_compute.labels(model, str(steps)).observe(compute_s)
            i = 0
            for job in batch:
                if not job.future.done():
                    own = None if scores is None else scores[i : i + job.n]
                    job.future.set_result(
                        JobResult(images[i : i + job.n], started - job.enqueued, compute_s, len(seeds), own)
                    )
                i += job.n
        finally:
            elapsed = time.monotonic() - started
            self._batch_s = 0.8 * self._batch_s + 0.2 * elapsed
            key = (model, steps)
            self._key_s[key] = 0.8 * self._key_s.get(key, elapsed) + 0.2 * elapsed
            self._running = []
            self.batches_run += 1

    def _run_and_score(
        self, steps: int, labels: list[int | None], seeds: list[int], model: str, edits: list[Any] | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """On the compute thread: the batch, then its accept check."""
        images = self.run_batch(steps, labels, seeds, model, edits)
        if images.shape[0] != len(seeds):
            raise RuntimeError(f"batch returned {images.shape[0]} images for {len(seeds)} requested")
        scores = self.score_fn(model, images, labels) if self.score_fn is not None else None
        return images, scores

    def snapshot(self) -> dict[str, Any]:
        return {
            "queued_images": self._queued_images,
            "queued_requests": len(self._pending),
            "running_requests": len(self._running),
            "batches_run": self.batches_run,
        }
