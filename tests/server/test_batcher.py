"""The batcher with a fake sampler: dispatch on idle, size cap, step grouping, fault isolation,
deadlines, disconnects and the queue bound."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.batcher import Batcher, BatchFailed, DeadlineExceeded, Draining, Job, QueueFull
from server.metrics import Metrics


class FakeSampler:
    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []  # (steps, seeds)
        self.models: list[str] = []  # the model of each batch
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def __call__(
        self,
        steps: int,
        labels: list[int | None],
        seeds: list[int],
        model: str,
        edits: list | None,  # type: ignore[type-arg]
    ) -> np.ndarray:
        self.gate.wait(5)
        self.batches.append((steps, list(seeds)))
        self.models.append(model)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected")
        # image i carries its seed, so results can be matched to requests
        return np.array(seeds, dtype=np.int64).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 1), dtype=np.int64)


def _job(steps: int, seeds: list[int], rid: str = "r", timeout: float = 10.0, model: str = "") -> Job:
    return Job(
        model=model,
        steps=steps,
        labels=[None] * len(seeds),
        seeds=seeds,
        deadline=time.monotonic() + timeout,
        request_id=rid,
        future=asyncio.get_running_loop().create_future(),
    )


def _batcher(sampler: FakeSampler, **kw: float) -> Batcher:
    args: dict = {"max_batch_size": 8, "max_queue_images": 100, **kw}
    b = Batcher(sampler, Metrics(), **args)
    b.start()
    return b


async def test_idle_worker_dispatches_a_lone_request_at_once() -> None:
    s = FakeSampler()
    b = _batcher(s)
    job = _job(2, [7])
    b.submit(job)
    res = await asyncio.wait_for(job.future, 2)
    assert s.batches == [(2, [7])]
    assert res.queue_s < 0.05  # no fixed wait before dispatch
    assert res.images[0, 0, 0, 0] == 7
    await b.stop()


async def test_batches_respect_the_image_cap_and_never_split_requests() -> None:
    s = FakeSampler()
    s.gate.clear()  # hold the first batch so the rest accumulate
    b = _batcher(s)
    first = _job(2, [0])
    b.submit(first)
    await asyncio.sleep(0.05)
    jobs = [_job(2, [100 * i + k for k in range(3)], f"r{i}") for i in range(6)]  # 6 requests x 3 images
    for j in jobs:
        b.submit(j)
    s.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
    sizes = [len(seeds) for _, seeds in s.batches[1:]]
    assert sizes == [6, 6, 6]  # 8-image cap, 3-image requests never split
    for j, r in zip(jobs, results):
        assert list(r.images[:, 0, 0, 0]) == j.seeds
    await b.stop()


async def test_a_request_larger_than_the_cap_runs_alone() -> None:
    s = FakeSampler()
    b = _batcher(s)
    big = _job(1, list(range(20)))
    b.submit(big)
    res = await asyncio.wait_for(big.future, 2)
    assert len(res.images) == 20 and s.batches == [(1, list(range(20)))]
    await b.stop()


async def test_requests_with_different_steps_go_to_different_batches() -> None:
    s = FakeSampler()
    s.gate.clear()
    b = _batcher(s)
    b.submit(_job(1, [0]))
    await asyncio.sleep(0.05)
    jobs = [_job(steps, [10 * i + steps]) for i, steps in enumerate([1, 2, 1, 4, 2, 1])]
    for j in jobs:
        b.submit(j)
    s.gate.set()
    await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
    for steps, seeds in s.batches:
        assert all(seed % 10 == steps for seed in seeds) or seeds == [0]
    # the oldest request's step count goes first, and each count is one batch
    assert [st for st, _ in s.batches[1:]] == [1, 2, 4]
    await b.stop()


async def test_a_batch_never_mixes_models_and_each_model_has_its_own_cap() -> None:
    s = FakeSampler()
    s.gate.clear()
    b = _batcher(s, model_max_batch={"big": 3})  # "small" keeps the server's cap of 8
    b.submit(_job(2, [0], model="small"))
    await asyncio.sleep(0.05)
    # seed 100·k + i: k = 1 for "big", 2 for "small"
    jobs = [_job(2, [100 * (1 + (i % 2)) + i], model=("big", "small")[i % 2]) for i in range(10)]
    for j in jobs:
        b.submit(j)
    s.gate.set()
    await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
    for model, (_, seeds) in list(zip(s.models, s.batches))[1:]:
        assert {seed // 100 for seed in seeds} == {1 if model == "big" else 2}
        assert len(seeds) <= (3 if model == "big" else 8)
    # the oldest waiting request ("big") goes first; 5 of it need two batches under its cap of 3
    assert s.models[1:] == ["big", "small", "big"]
    await b.stop()


async def test_a_failing_batch_fails_only_its_requests_and_the_next_runs() -> None:
    s = FakeSampler()
    b = _batcher(s)
    s.fail_next = True
    bad = _job(2, [1], "bad")
    b.submit(bad)
    with pytest.raises(BatchFailed) as e:
        await asyncio.wait_for(bad.future, 2)
    assert e.value.request_ids == ["bad"]
    good = _job(2, [2], "good")
    b.submit(good)
    res = await asyncio.wait_for(good.future, 2)
    assert res.images[0, 0, 0, 0] == 2
    assert b.metrics.batch_failures.labels("exception")._value.get() == 1
    await b.stop()


async def test_expired_and_abandoned_requests_never_reach_the_sampler() -> None:
    s = FakeSampler()
    s.gate.clear()
    b = _batcher(s)
    b.submit(_job(2, [0]))
    await asyncio.sleep(0.05)
    expired = _job(2, [1], timeout=0.01)
    gone = _job(2, [2])
    gone.client_gone = True
    live = _job(2, [3])
    for j in (expired, gone, live):
        b.submit(j)
    await asyncio.sleep(0.05)
    s.gate.set()
    await asyncio.wait_for(live.future, 2)
    with pytest.raises(DeadlineExceeded):
        await expired.future
    assert gone.future.cancelled()
    computed = [seed for _, seeds in s.batches for seed in seeds]
    assert computed == [0, 3]
    await b.stop()


async def test_queue_bound_rejects_with_retry_after_and_stop_answers_the_rest() -> None:
    s = FakeSampler()
    s.gate.clear()
    b = _batcher(s, max_queue_images=5)
    b.submit(_job(2, [0]))
    await asyncio.sleep(0.05)  # now running, queue empty
    waiting = _job(2, [1, 2, 3, 4])
    b.submit(waiting)
    with pytest.raises(QueueFull) as e:
        b.submit(_job(2, [5, 6]))
    assert e.value.retry_after_s >= 1
    b.submit(_job(2, [7]))  # exactly fills the bound
    s.gate.set()
    await asyncio.wait_for(waiting.future, 2)
    s.gate.clear()
    b.submit(_job(2, [8]))
    await asyncio.sleep(0.05)
    tail = _job(2, [9])
    b.submit(tail)
    s.gate.set()
    await b.stop()
    assert tail.future.done()  # answered: either computed or Draining
    if tail.future.exception() is not None:
        assert isinstance(tail.future.exception(), Draining)


async def test_max_wait_holds_a_partial_batch_for_company() -> None:
    s = FakeSampler()
    b = _batcher(s, max_wait_s=0.2)
    a = _job(2, [1])
    b.submit(a)
    await asyncio.sleep(0.05)
    c = _job(2, [2])
    b.submit(c)
    await asyncio.wait_for(asyncio.gather(a.future, c.future), 2)
    assert s.batches == [(2, [1, 2])]
    await b.stop()


async def test_stop_answers_the_batch_in_flight_and_the_queue() -> None:
    """stop() while a batch runs: its requests and the queued ones each get Draining."""
    s = FakeSampler()
    s.gate.clear()  # the first batch blocks in the sampler
    b = _batcher(s, max_batch_size=2)
    running, queued = _job(2, [1, 2], "run"), _job(2, [3], "queued")
    b.submit(running)
    for _ in range(100):
        if b.snapshot()["running_requests"]:
            break
        await asyncio.sleep(0.01)
    b.submit(queued)
    stopper = asyncio.create_task(b.stop())
    await asyncio.sleep(0.05)
    s.gate.set()  # let the executor thread finish so stop() can shut it down
    await asyncio.wait_for(stopper, 5)
    for job in (running, queued):
        assert job.future.done() and isinstance(job.future.exception(), Draining), job.request_id


def _prio(job: Job, priority: str) -> Job:
    job.priority = priority
    return job


async def test_batch_priority_never_runs_while_interactive_work_waits() -> None:
    s = FakeSampler()
    s.gate.clear()  # hold the first batch so the rest queue up behind it
    b = _batcher(s, max_batch_size=2)
    b.submit(_job(2, [0]))
    await asyncio.sleep(0.05)
    low = [_prio(_job(2, [100 + i]), "batch") for i in range(3)]
    high = [_job(2, [10 + i]) for i in range(3)]
    for lo, hi in zip(low, high, strict=True):  # interleaved, each batch job older than its peer
        b.submit(lo)
        b.submit(hi)
    s.gate.set()
    await asyncio.wait_for(asyncio.gather(*(j.future for j in low + high)), 5)
    order = [seed for _, seeds in s.batches[1:] for seed in seeds]
    # every interactive image ran before any batch-priority one, although the latter queued first
    assert order == [10, 11, 12, 100, 101, 102], s.batches
    await b.stop()


async def test_batch_priority_is_refused_first() -> None:
    s = FakeSampler()
    s.gate.clear()
    b = _batcher(s, max_queue_images=10, batch_share=0.5)
    b.submit(_job(2, [0]))
    await asyncio.sleep(0.05)
    for i in range(5):
        b.submit(_prio(_job(2, [i + 1]), "batch"))  # fills the batch share: 5 of 10
    with pytest.raises(QueueFull) as e:
        b.submit(_prio(_job(2, [9]), "batch"))
    assert e.value.reason == "batch_queue_share"
    for i in range(5):
        b.submit(_job(2, [20 + i]))  # interactive work still fits up to the full bound
    with pytest.raises(QueueFull) as e:
        b.submit(_job(2, [30]))
    assert e.value.reason == "queue_full"
    s.gate.set()
    await b.stop()


async def test_background_work_runs_a_slice_at_a_time_only_while_nothing_waits() -> None:
    s = FakeSampler()
    events: list[str] = []  # appended on the compute thread, so in the order things ran there

    def sampler(*a):  # type: ignore[no-untyped-def]
        events.append("job")
        return s(*a)

    b = _batcher(s)
    b.run_batch = sampler
    slices = iter(range(6))

    def task() -> bool:  # six slices; the third holds the thread a little while a job arrives
        k = next(slices)
        events.append(f"slice{k}")
        if k == 2:
            time.sleep(0.1)
        return k == 5

    assert b.submit_background(task)
    while "slice2" not in events:
        await asyncio.sleep(0.005)
    job = _job(2, [7])
    b.submit(job)  # arrives while slice 2 runs
    await asyncio.wait_for(job.future, 2)
    while "slice5" not in events:
        await asyncio.sleep(0.005)
    # the job waited for the slice in progress only, then ran before the next one
    assert events == ["slice0", "slice1", "slice2", "job", "slice3", "slice4", "slice5"], events
    await b.stop()


async def test_background_backlog_is_bounded() -> None:
    b = _batcher(FakeSampler())
    b.max_background = 2
    s = FakeSampler()
    s.gate.clear()
    b.run_batch = s
    b.submit(_job(2, [1]))  # keeps the loop busy so nothing in the backlog runs
    await asyncio.sleep(0.05)
    assert b.submit_background(lambda: True) and b.submit_background(lambda: True)
    assert not b.submit_background(lambda: True)
    s.gate.set()
    await b.stop()


async def test_scores_run_after_each_batch_and_are_split_per_request() -> None:
    s = FakeSampler()
    calls: list[tuple[str, int]] = []

    def score(model: str, images: np.ndarray, labels: list[int | None]) -> np.ndarray:
        calls.append((model, len(images)))
        return images[:, 0, 0, 0].astype(float) / 100.0  # image i's seed / 100

    s.gate.clear()
    b = _batcher(s, score_fn=score)
    b.submit(_job(2, [0]))
    await asyncio.sleep(0.05)
    a, c = _job(2, [10, 20]), _job(2, [30])
    b.submit(a)
    b.submit(c)
    s.gate.set()
    ra, rc = await asyncio.wait_for(asyncio.gather(a.future, c.future), 2)
    assert calls == [("", 1), ("", 3)]  # one call per batch, over all of it
    assert ra.scores is not None and list(ra.scores) == [0.1, 0.2] and list(rc.scores) == [0.3]
    await b.stop()


async def test_background_work_keeps_to_its_share_of_the_compute_thread() -> None:
    s = FakeSampler()
    b = _batcher(s, background_share=0.01)  # 0.1 s per 10 s window
    slices: list[float] = []

    def task() -> bool:  # never finishes; each slice takes 50 ms
        slices.append(time.monotonic())
        time.sleep(0.05)
        return False

    b.submit_background(task)
    await asyncio.sleep(0.6)
    assert len(slices) == 2  # 2 x 50 ms fill the share; the rest waits for the window to move
    job = _job(2, [7])
    t0 = time.monotonic()
    b.submit(job)  # jobs are not held back by the share
    await asyncio.wait_for(job.future, 2)
    assert time.monotonic() - t0 < 0.2 and len(slices) == 2
    await b.stop()
