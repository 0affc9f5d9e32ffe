"""Per-key fairness: a request-rate limit per key, and a cap on one key's share of the queue,
each a 429 with the key's own Retry-After, while other keys are served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from server.batcher import Batcher, Job, QueueFull
from server.fairness import RateLimiter
from server.metrics import Metrics
from server.settings import Settings
from tests.server.helpers import app_client
from tests.server.test_batcher import FakeSampler


def test_token_bucket() -> None:
    lim = RateLimiter(rate=2.0, burst=3)
    assert [lim.take("a", now=0.0) for _ in range(4)] == [0, 0, 0, 1]
    assert lim.take("b", now=0.0) == 0  # buckets are per tenant
    assert lim.take("a", now=0.5) == 0  # half a second at 2/s: one token back
    assert lim.take("a", now=0.5) == 1
    assert RateLimiter(0.0, 0).take("a") == 0  # no limit configured


async def test_a_key_over_its_rate_gets_429_and_the_others_are_served(tiny_ckpt: Path) -> None:
    settings = Settings(
        checkpoint=str(tiny_ckpt),
        buckets=[1, 2],
        api_keys=["key-a", "key-b"],
        key_rate_limit=0.5,
        key_rate_burst=2,
    )  # type: ignore[call-arg]
    async with app_client(settings) as (c, app):

        async def post(key: str) -> tuple[int, dict[str, str]]:
            r = await c.post("/v1/generate", json={"seed": 1}, headers={"authorization": f"Bearer {key}"})
            return r.status_code, dict(r.headers)

        assert [(await post("key-a"))[0] for _ in range(2)] == [200, 200]
        status, headers = await post("key-a")
        assert status == 429 and int(headers["retry-after"]) == 2  # one token at 0.5/s
        assert (await post("key-b"))[0] == 200
        metrics = (await c.get("/metrics")).text
        assert 'cmserve_rejected_total{reason="key_rate"} 1.0' in metrics


async def test_one_key_cannot_fill_the_shared_queue() -> None:
    s = FakeSampler()
    s.gate.clear()  # the worker holds the first batch: everything else queues
    b = Batcher(s, Metrics(), max_batch_size=4, max_queue_images=8, tenant_share=0.25)  # 2 images per key
    b.start()

    def job(tenant: str, seed: int) -> Job:
        loop = asyncio.get_running_loop()
        return Job(steps=2, labels=[None], seeds=[seed], deadline=time.monotonic() + 10, request_id=str(seed),
                   future=loop.create_future(), tenant=tenant)  # fmt: skip

    first = job("a", 0)
    b.submit(first)
    await asyncio.sleep(0.05)  # now computing
    a1, a2 = job("a", 1), job("a", 2)
    b.submit(a1)
    b.submit(a2)
    with pytest.raises(QueueFull) as e:
        b.submit(job("a", 3))
    assert e.value.reason == "key_queue_share" and e.value.retry_after_s >= 1
    other = job("b", 4)
    b.submit(other)  # another key still gets in
    s.gate.set()
    await asyncio.wait_for(asyncio.gather(first.future, a1.future, a2.future, other.future), 5)
    b.submit(job("a", 5))  # served jobs no longer count against the key
    await b.stop()
