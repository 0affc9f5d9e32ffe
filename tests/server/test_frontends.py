"""`--frontends N`, in one process: a front-end app (server/remote.py) talking over the real Unix
socket protocol to an engine app's FrontendPool (server/frontends.py) that spawns no process.
The multi-process server itself is tested in tests/reliability/test_frontends.py."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.frontends import FrontendPool
from server.metrics import Merged, families
from server.remote import connect
from server.settings import Settings
from tests.server.helpers import app_client


@asynccontextmanager
async def linked(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any, httpx.AsyncClient, Any]]:
    """(engine client, engine app, front-end client, front-end app): the front end reaches the
    engine only through the pool's socket."""
    async with app_client(settings) as (eclient, eapp):
        pool = await FrontendPool(eapp.state.cm, 0).start()
        stops: list[int] = []
        fapp = create_app(
            settings, starter=lambda st: connect(st, pool.path, 0, stop=lambda: stops.append(1))
        )
        fapp.state.stops = stops
        fapp.state.pool = pool
        transport = httpx.ASGITransport(app=fapp)
        try:
            async with (
                fapp.router.lifespan_context(fapp),
                httpx.AsyncClient(transport=transport, base_url="http://fe") as fc,
            ):
                for _ in range(1000):
                    if fapp.state.cm.ready:
                        break
                    await asyncio.sleep(0.01)
                assert fapp.state.cm.ready, fapp.state.cm.load_error
                yield eclient, eapp, fc, fapp
        finally:
            await pool.close()


def _pixels(body: dict[str, Any]) -> list[np.ndarray]:
    import io

    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in body["data"]]


def gate_batches(eapp: Any) -> tuple[threading.Event, list[list[int]]]:
    """Hold the engine's batches until the event is set; record each batch's seeds."""
    batcher = eapp.state.cm.batcher
    real, gate, seen = batcher.run_batch, threading.Event(), []

    def run(steps: int, labels: Any, seeds: list[int], model: str, edits: Any) -> Any:
        gate.wait(10)
        seen.append(list(seeds))
        return real(steps, labels, seeds, model, edits)

    batcher.run_batch = run
    return gate, seen


async def test_front_end_answers_as_the_engine_process_does(tiny_ckpt: Path) -> None:
    async with linked(Settings(checkpoint=str(tiny_ckpt))) as (ec, _, fc, _fapp):
        body = {"class_label": 3, "seed": 11, "n": 3, "steps": 2}
        mine, theirs = await asyncio.gather(
            fc.post("/v1/generate", json=body), ec.post("/v1/generate", json=body)
        )
        assert mine.status_code == theirs.status_code == 200, mine.text
        for a, b in zip(_pixels(mine.json()), _pixels(theirs.json()), strict=True):
            np.testing.assert_array_equal(a, b)
        assert [d["seed"] for d in mine.json()["data"]] == [11, 12, 13]
        # the front end validates on its own: the engine never hears of a bad request
        bad = await fc.post("/v1/generate", json={"class_label": 99})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "class_label"
        for path in ("/v1/models", "/openapi.json"):  # the same cards, limits and tiers
            assert (await fc.get(path)).json() == (await ec.get(path)).json(), path


async def test_edits_interpolations_and_the_openai_route_through_a_front_end(tiny_ckpt: Path) -> None:
    from tests.server.test_edits import DIGIT, MASK, png

    async with linked(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 4])) as (ec, _, fc, _fapp):
        files = {"image": ("d.png", png(DIGIT), "image/png"), "mask": ("m.png", png(MASK), "image/png")}
        form = {"n": "2", "seed": "4", "class_label": "7"}
        calls = [
            lambda c: c.post("/v1/images/edits", files=files, data=form),
            lambda c: c.post("/v1/images/interpolations", json={"seed": 3, "seed_b": 8, "frames": 3}),
            lambda c: c.post("/v1/images/generations", json={"prompt": "7", "n": 2, "seed": 5}),
        ]
        for call in calls:
            mine, theirs = await call(fc), await call(ec)
            assert mine.status_code == theirs.status_code == 200, mine.text
            assert [d["b64_json"] for d in mine.json()["data"]] == [
                d["b64_json"] for d in theirs.json()["data"]
            ]


async def test_queue_full_and_cancellation_cross_the_socket(tiny_ckpt: Path) -> None:
    s = Settings(checkpoint=str(tiny_ckpt), max_queue_images=4, max_batch_size=4)
    async with linked(s) as (_, eapp, fc, _fapp):
        gate, seen = gate_batches(eapp)
        first = asyncio.create_task(fc.post("/v1/generate", json={"seed": 100, "n": 4, "class_label": 1}))
        while not seen and eapp.state.cm.batcher.snapshot()["running_requests"] == 0:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(
            fc.post("/v1/generate", json={"seed": 200, "n": 4, "class_label": 1, "timeout_s": 0.3})
        )
        await asyncio.sleep(0.1)
        # the engine's queue holds 4 images: one more is refused there, and heard of here
        full = await fc.post("/v1/generate", json={"seed": 300, "n": 1, "class_label": 1})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        # the queued request's deadline passes in the front end: it answers 504 and tells the
        # engine, which drops the job before any compute is spent on it
        assert (await queued).status_code == 504
        gate.set()
        assert (await first).status_code == 200
        await asyncio.sleep(0.2)
        assert seen == [[100, 101, 102, 103]]
        assert eapp.state.cm.batcher.snapshot()["queued_images"] == 0


async def test_losing_the_engine_answers_what_waits_and_drains(tiny_ckpt: Path) -> None:
    async with linked(Settings(checkpoint=str(tiny_ckpt))) as (_, eapp, fc, fapp):
        gate, _seen = gate_batches(eapp)
        waiting = asyncio.create_task(fc.post("/v1/generate", json={"seed": 1, "class_label": 0}))
        await asyncio.sleep(0.2)
        await fapp.state.pool.close()  # the engine process's side of every connection closes
        r = await waiting
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert fapp.state.stops == [1]  # the front end begins its drain
        assert (await fc.get("/readyz")).status_code == 503
        assert (await fc.get("/metrics")).status_code == 503  # a question for the engine: 503
        gate.set()


async def test_engine_drain_reaches_the_front_ends(tiny_ckpt: Path) -> None:
    async with linked(Settings(checkpoint=str(tiny_ckpt))) as (_, eapp, _fc, fapp):
        eapp.state.cm.begin_drain()
        for _ in range(100):
            if fapp.state.stops:
                break
            await asyncio.sleep(0.01)
        assert fapp.state.stops == [1]


async def test_a_keys_rate_limit_holds_across_processes(tiny_ckpt: Path) -> None:
    s = Settings(checkpoint=str(tiny_ckpt), api_keys=["k1"], key_rate_limit=0.01, key_rate_burst=2)
    async with linked(s) as (ec, _, fc, _fapp):
        auth = {"authorization": "Bearer k1"}
        body = {"seed": 1, "class_label": 0}
        assert (await ec.post("/v1/generate", json=body, headers=auth)).status_code == 200
        assert (await fc.post("/v1/generate", json=body, headers=auth)).status_code == 200
        third = await fc.post("/v1/generate", json=body, headers=auth)  # the burst of 2 is spent
        assert third.status_code == 429 and third.json()["error"]["code"] == "key_rate_limited"


async def test_metrics_anywhere_count_every_process(tiny_ckpt: Path) -> None:
    async with linked(Settings(checkpoint=str(tiny_ckpt))) as (ec, _, fc, _fapp):
        for i in range(3):
            assert (await fc.post("/v1/generate", json={"seed": i, "class_label": 0})).status_code == 200
        assert (await ec.post("/v1/generate", json={"seed": 9, "class_label": 0})).status_code == 200
        text = (await fc.get("/metrics")).text  # the front end asks the engine, sending its own
        generated = _value(text, "cmserve_request_duration_seconds_count", route="/v1/generate")
        assert generated == 4  # 3 from the front end, 1 served by the engine process's own app
        assert _value(text, "cmserve_queue_wait_seconds_count") == 4  # the engine's batcher
        assert _value(text, "cmserve_ready") == 1  # a gauge: the engine's alone, not summed


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_merged_sums_counters_and_histograms_keeps_the_engines_gauges() -> None:
    def registry(count: int, inflight: int, ready: int) -> CollectorRegistry:
        r = CollectorRegistry()
        c = Counter("cmserve_x_total", "x", ["k"], registry=r)
        c.labels("a").inc(count)
        h = Histogram("cmserve_y_seconds", "y", buckets=(0.1, 1.0), registry=r)
        h.observe(0.05 * count)
        Gauge("cmserve_inflight_requests", "i", registry=r).set(inflight)
        Gauge("cmserve_ready", "r", registry=r).set(ready)
        return r

    engine, fe1, fe2 = registry(1, 0, 1), registry(2, 3, 0), registry(4, 5, 1)
    fe2_only = Counter("cmserve_z_total", "z", registry=fe2)
    fe2_only.inc(7)
    text = generate_latest(Merged(engine, [families(fe1), families(fe2)])).decode()  # type: ignore[arg-type]
    assert _value(text, "cmserve_x_total", k="a") == 7
    assert _value(text, "cmserve_y_seconds_count") == 3
    assert _value(text, "cmserve_y_seconds_bucket", le="0.1") == 2  # 0.05 and 0.1; not 0.2
    assert _value(text, "cmserve_inflight_requests") == 8
    assert _value(text, "cmserve_ready") == 1
    assert _value(text, "cmserve_z_total") == 7


@pytest.mark.parametrize("n", [0, 65])
def test_frontends_setting_is_bounded(n: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(frontends=n)
