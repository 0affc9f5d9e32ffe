"""Step-level batching: requests join and leave at every evaluation, and every image is the
same PNG, byte for byte, as request-level batching gives for the same model, steps, seed and
class, whatever it shared evaluations with."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.editing import Constraint
from server.settings import Settings
from tests.server.helpers import app_client
from tests.server.test_edits import DIGIT, MASK, decode, png

TEACHER = Path(__file__).resolve().parents[2] / "models" / "weights" / "teacher-mnist.json"


def _settings(ckpt: Path, batching: str) -> Settings:
    return Settings(
        models=[f"cm={ckpt}", f"teacher={TEACHER}"], buckets=[1, 2, 4, 8], max_batch_size=8, batching=batching
    )  # type: ignore[arg-type]


def _requests() -> list[dict[str, Any]]:
    rng = random.Random(0)
    reqs: list[dict[str, Any]] = []
    for i in range(24):
        if i % 8 == 5:
            reqs.append({"model": "teacher", "steps": 32, "seed": 1000 + i, "class_label": i % 10})
        else:
            reqs.append({"model": "cm", "steps": rng.choice([1, 2, 3, 4]), "n": rng.choice([1, 2, 3]),
                         "seed": 10 * i, "class_label": rng.choice([None, 1, 7])})  # fmt: skip
    return reqs


async def _images(c: Any, reqs: list[dict[str, Any]], together: bool) -> list[list[bytes]]:
    async def one(body: dict[str, Any]) -> list[bytes]:
        r = await c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        return [d["b64_json"].encode() for d in r.json()["data"]]

    if together:
        return list(await asyncio.gather(*(one(b) for b in reqs)))
    return [await one(b) for b in reqs]


async def test_step_batching_gives_request_batchings_images(tiny_ckpt: Path) -> None:
    reqs = _requests()
    async with app_client(_settings(tiny_ckpt, "request")) as (c, _):
        want = await _images(c, reqs, together=False)
    async with app_client(_settings(tiny_ckpt, "step")) as (c, app):
        got = await _images(c, reqs, together=True)  # mixed: steps 1-4 and the teacher's 32
        batcher = app.state.cm.batcher
        assert batcher.batches_run < sum(b.get("steps", 2) * b.get("n", 1) for b in reqs)  # rows shared
        metrics = (await c.get("/metrics")).text
    assert got == want
    # both networks had their turns, and evaluations mixed rows of different step counts
    assert 'cmserve_batch_compute_seconds_count{model="teacher",steps="step"}' in metrics
    assert 'cmserve_batch_compute_seconds_count{model="cm",steps="step"}' in metrics


async def test_short_requests_pass_a_long_one(tiny_ckpt: Path) -> None:
    """A 32-step teacher request sent first does not hold the compute thread: 2-step requests sent
    after it finish before it."""
    async with app_client(_settings(tiny_ckpt, "step")) as (c, _):
        done: list[str] = []

        async def one(name: str, body: dict[str, Any]) -> None:
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 200
            done.append(name)

        long = asyncio.create_task(one("teacher", {"model": "teacher", "steps": 32, "seed": 1}))
        await asyncio.sleep(0.02)
        await asyncio.gather(*(one(f"cm{i}", {"model": "cm", "steps": 2, "seed": i}) for i in range(3)), long)
        assert done[-1] == "teacher", done


async def test_edits_and_disconnects_in_step_mode(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, "step")) as (c, app):
        files = {"image": ("d.png", png(DIGIT), "image/png"), "mask": ("m.png", png(MASK), "image/png")}
        r = await c.post("/v1/images/edits", files=files, data={"seed": "3", "steps": "2", "n": "2"})
        assert r.status_code == 200, r.text
        for d in r.json()["data"]:
            assert np.array_equal(decode(d["b64_json"])[14:], DIGIT[14:])
        r = await c.post("/v1/images/interpolations", json={"seed": 3, "seed_b": 4, "frames": 3})
        assert r.status_code == 200
        # a request whose deadline passes mid-flight gets its 504 and its rows leave
        r = await c.post("/v1/generate", json={"model": "teacher", "steps": 32, "timeout_s": 0.05})
        assert r.status_code == 504
        await asyncio.sleep(0.3)
        assert app.state.cm.batcher.snapshot()["rows_in_flight"].get("teacher", 0) == 0


async def test_edited_and_plain_rows_in_flight_together_give_request_batchings_images(
    tiny_ckpt: Path,
) -> None:
    """Evaluations with an edited row in flight run the constraints' variant, the others the
    plain one: plain and edited images alike equal request-level batching's, byte for byte."""
    import base64

    image, mask = (base64.b64encode(png(a)).decode() for a in (DIGIT, MASK))
    calls: list[tuple[str, dict[str, Any]]] = []
    for i in range(8):
        if i % 3 == 1:
            calls.append(("/v1/images/edits", {"image": image, "mask": mask, "seed": i, "steps": 1 + i % 4}))
        else:
            calls.append(
                ("/v1/generate", {"model": "cm", "seed": i, "steps": 1 + i % 4, "class_label": i % 10})
            )

    async def run(c: Any, together: bool) -> list[list[str]]:
        async def one(path: str, body: dict[str, Any]) -> list[str]:
            r = await c.post(path, json=body)
            assert r.status_code == 200, r.text
            return [d["b64_json"] for d in r.json()["data"]]

        if together:
            return list(await asyncio.gather(*(one(p, b) for p, b in calls)))
        return [await one(p, b) for p, b in calls]

    async with app_client(_settings(tiny_ckpt, "request")) as (c, _):
        want = await run(c, together=False)
    async with app_client(_settings(tiny_ckpt, "step")) as (c, _):
        got = await run(c, together=True)
        assert got == want
        assert await run(c, together=False) == want
        # with no edited row in flight an evaluation projects nothing
        projections = []
        project = Constraint.project

        def counted(self: Constraint, x0: Any) -> Any:
            projections.append(1)
            return project(self, x0)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Constraint, "project", counted)
            r = await c.post("/v1/generate", json={"model": "cm", "seed": 1, "steps": 2})
            assert r.status_code == 200 and not projections
            assert (await run(c, together=False)) == want and projections


async def test_a_max_batch_above_the_largest_bucket_is_held_to_it(tiny_ckpt: Path) -> None:
    """Rows in flight never exceed the step runner's buffers, whatever --max-batch-size says."""
    s = Settings(checkpoint=str(tiny_ckpt), buckets=[1, 2], max_batch_size=8, batching="step")  # type: ignore[arg-type]
    async with app_client(s) as (c, app):
        rs = await asyncio.gather(*(c.post("/v1/generate", json={"seed": i, "n": 2}) for i in range(5)))
        assert [r.status_code for r in rs] == [200] * 5
        assert app.state.cm.batcher.limit(app.state.cm.engine.default) == 2
