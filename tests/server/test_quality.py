"""Cost per accepted output through the API: quality tiers, accept checks with re-roll or
escalation, degrade under a latency objective, shadow draws. A deterministic test scorer
(tests/server/scorers.py) makes every score recomputable from the PNG that came back."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.settings import Settings
from server.shadow import ShadowDraw
from server.tiers import reroll_seed
from tests.server.helpers import app_client
from tests.server.scorers import checksum_score

SCORER = "tests.server.scorers:checksum"


def _settings(ckpt: Path, **kw: Any) -> Settings:
    """Model `a` (scored, `ref` as its reference tier) and `ref` (not scored)."""
    base: dict[str, Any] = {
        "models": [f"a={ckpt}", f"ref={ckpt}"], "references": ["a=ref"], "scorers": [f"a={SCORER}"],
        "buckets": [1, 2, 4, 8], "max_batch_size": 8, "accept_threshold": 0.5,
    }  # fmt: skip
    return Settings(**{**base, **kw})


def _pixels(b64: str) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return img[..., None] if img.ndim == 2 else img


async def _one(c: Any, **body: Any) -> dict[str, Any]:
    r = await c.post("/v1/generate", json={"class_label": 3, **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def _metric(c: Any, name: str) -> float:
    text = (await c.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def test_tiers_map_to_their_samplers(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        card = next(m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == "a")
        assert card["tiers"] == {
            "fast": {"model": "a", "steps": 1}, "standard": {"model": "a", "steps": 2},
            "high": {"model": "a", "steps": 4}, "reference": {"model": "ref", "steps": 2},
        }  # fmt: skip
        assert card["accept_check"] is True
        rungs = [("fast", "a", 1), ("standard", "a", 2), ("high", "a", 4), ("reference", "ref", 2)]
        for quality, model, steps in rungs:
            tiered = await _one(c, model="a", quality=quality, seed=11, n=2)
            plain = await _one(c, model=model, steps=steps, seed=11, n=2)
            assert [d["b64_json"] for d in tiered["data"]] == [d["b64_json"] for d in plain["data"]], quality
            assert tiered["tier"] == quality and tiered["steps"] == steps
            assert {(d["model"], d["steps"], d["tier"]) for d in tiered["data"]} == {(model, steps, quality)}
        default = await _one(c, model="a", seed=11)
        assert default["tier"] == "standard" and default["requested_tier"] == "standard"
        assert (await _one(c, model="a", steps=3, seed=1))["tier"] is None  # steps outside the tiers


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_resample_redraws_only_rejected_images_and_stops_at_max_attempts(
    tiny_ckpt: Path, batching: str
) -> None:
    async with app_client(_settings(tiny_ckpt, batching=batching)) as (c, _):
        out = await _one(c, model="a", n=12, seed=40, quality="fast", on_reject="resample", max_attempts=3)
        data = out["data"]
        attempts = [d["attempts"] for d in data]
        assert sum(attempts) > len(data)  # some were re-drawn (the seeds were chosen so)
        for i, d in enumerate(data):
            score = checksum_score(_pixels(d["b64_json"]))
            assert d["score"] == pytest.approx(score) and d["accepted"] == (score >= 0.5)
            assert d["seed"] == reroll_seed(40 + i, d["attempts"])
            assert d["accepted"] or d["attempts"] == 3  # rejected only once the attempts ran out
            if d["attempts"] > 1:  # the re-drawn image is the one its seed gives, batch or not
                alone = await _one(c, model="a", steps=1, seed=d["seed"])
                assert alone["data"][0]["b64_json"] == d["b64_json"]
        assert await _metric(c, "cmserve_rerolled_images_total") == sum(attempts) - len(data)
        drawn = await _metric(c, "cmserve_tier_images_total")
        assert drawn == sum(attempts) + sum(1 for a in attempts if a > 1)  # + the lone checks above


async def test_escalate_moves_rejected_images_up_a_tier_with_their_seed(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, max_attempts=4)) as (c, _):
        out = await _one(c, model="a", n=12, seed=40, quality="fast", on_reject="escalate", max_attempts=4)
        rungs = [("fast", "a", 1), ("standard", "a", 2), ("high", "a", 4), ("reference", "ref", 2)]
        assert out["tier"] == "fast"
        assert any(d["tier"] != "fast" for d in out["data"])
        for i, d in enumerate(out["data"]):
            assert d["seed"] == 40 + i  # escalation keeps the seed
            assert (d["tier"], d["model"], d["steps"]) == rungs[d["attempts"] - 1]
            earlier_rejected = d["attempts"] > 1
            if earlier_rejected:
                plain = await _one(c, model=d["model"], steps=d["steps"], seed=d["seed"])
                assert plain["data"][0]["b64_json"] == d["b64_json"]
            if d["tier"] == "reference":  # the reference model has no scorer: nothing to judge
                assert d["accepted"] is None and d["score"] is None
            else:
                assert d["accepted"] or d["attempts"] == 4


async def test_return_reports_only_and_unscored_models_say_null(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, on_reject="resample")) as (c, _):
        ret = await _one(c, model="a", n=12, seed=40, on_reject="return")
        assert [d["attempts"] for d in ret["data"]] == [1] * 12
        assert any(d["accepted"] is False for d in ret["data"]) and any(d["accepted"] for d in ret["data"])
        everyone = await _one(c, model="a", n=12, seed=40, accept_threshold=0)
        assert all(d["accepted"] and d["attempts"] == 1 for d in everyone["data"])
        nobody = await _one(
            c, model="a", n=3, seed=40, accept_threshold=1, max_attempts=2
        )  # server: resample
        assert all(not d["accepted"] and d["attempts"] == 2 for d in nobody["data"])
        unscored = await _one(c, model="ref", n=2, on_reject="resample")
        assert all(
            d["accepted"] is None and d["score"] is None and d["attempts"] == 1 for d in unscored["data"]
        )


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"quality": "best"}, "quality", "invalid_value"),
        ({"quality": "fast", "steps": 2}, "quality", "invalid_value"),
        ({"model": "ref", "quality": "reference"}, "quality", "unsupported_tier"),  # none configured
        ({"on_reject": "retry"}, "on_reject", "invalid_value"),
        ({"max_attempts": 0}, "max_attempts", "invalid_value"),
        ({"max_attempts": 4}, "max_attempts", "invalid_value"),  # above the server's 3
        ({"accept_threshold": 1.5}, "accept_threshold", "invalid_value"),
        ({"accept_threshold": "high"}, "accept_threshold", "invalid_value"),
        ({"allow_degrade": "yes"}, "allow_degrade", "invalid_value"),
        ({"priority": "urgent"}, "priority", "invalid_value"),
    ],
)
async def test_bad_quality_fields_are_422_naming_the_field(
    tiny_ckpt: Path, body: dict[str, Any], param: str, code: str
) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        r = await c.post("/v1/generate", json={"model": "a", "class_label": 1, **body})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code
        assert app.state.cm.batcher.batches_run == 0  # nothing reached the model


async def test_degrade_only_past_the_latency_objective(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, latency_slo_ms=1e-6)) as (c, _):  # always missed
        out = await _one(c, model="a", quality="standard", seed=3)
        assert (out["tier"], out["requested_tier"], out["degraded"], out["steps"]) == (
            "fast",
            "standard",
            True,
            1,
        )
        assert (
            out["data"][0]["b64_json"]
            == (await _one(c, model="a", quality="fast", seed=3))["data"][0]["b64_json"]
        )
        kept = await _one(c, model="a", quality="standard", seed=3, allow_degrade=False)
        assert (kept["tier"], kept["degraded"]) == ("standard", False)
        floor = await _one(c, model="a", quality="fast", seed=3)  # nothing below fast
        assert (floor["tier"], floor["degraded"]) == ("fast", False)
        assert await _metric(c, "cmserve_degraded_requests_total") == 1
    async with app_client(_settings(tiny_ckpt, latency_slo_ms=60_000)) as (c, _):  # never missed
        out = await _one(c, model="a", quality="standard", seed=3)
        assert (out["tier"], out["degraded"]) == ("standard", False)
    async with app_client(_settings(tiny_ckpt, latency_slo_ms=1e-6, allow_degrade=False)) as (c, _):
        assert (await _one(c, model="a", quality="standard"))["degraded"] is False
        assert (await _one(c, model="a", quality="standard", allow_degrade=True))["degraded"] is True


async def test_shadow_draws_the_reference_image_and_compares_scores(tiny_ckpt: Path) -> None:
    scorers = [f"a={SCORER}", f"ref={SCORER}"]
    async with app_client(_settings(tiny_ckpt, shadow_fraction=1.0, scorers=scorers)) as (c, app):
        await _one(c, model="a", quality="fast", seed=8, n=2)
        for _ in range(500):
            if await _metric(c, "cmserve_shadow_comparisons_total") >= 1:
                break
            await asyncio.sleep(0.01)
        assert await _metric(c, "cmserve_shadow_comparisons_total") == 1  # one per request, image 0
        # the shadow image is exactly the reference tier's image of that seed and class
        st = app.state.cm
        a = st.engine.get("a")
        draw = ShadowDraw(st.engine, st.metrics, ("a", "fast", 0.5, True), a.tiers[-1], 3, 8, 0.5)
        while not st.engine.call(draw):
            pass
        ref = await _one(c, model="a", quality="reference", seed=8)
        assert draw.image is not None
        assert np.array_equal(draw.image[0], _pixels(ref["data"][0]["b64_json"]))
        assert draw.score == pytest.approx(ref["data"][0]["score"])


async def test_openai_quality_words_map_to_tiers(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        for word, tier in (("low", "fast"), ("medium", "standard"), ("auto", "standard"), ("hd", "high")):
            r = await c.post(
                "/v1/images/generations", json={"prompt": "3", "model": "a", "seed": 9, "quality": word}
            )
            assert r.status_code == 200, r.text
            want = await _one(c, model="a", seed=9, quality=tier)
            assert r.json()["data"][0]["b64_json"] == want["data"][0]["b64_json"], word
            assert r.json()["steps"] == want["steps"]
        bad = await c.post("/v1/images/generations", json={"prompt": "3", "quality": "ultra"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "quality"


async def test_a_refused_redraw_keeps_the_images_and_is_not_a_rejected_request(tiny_ckpt: Path) -> None:
    from server.batcher import QueueFull

    async with app_client(_settings(tiny_ckpt)) as (c, app):
        batcher = app.state.cm.batcher
        real, calls = batcher.submit, []

        def submit(job: Any) -> None:  # the first draw is queued, every re-draw finds it full
            calls.append(job.n)
            if len(calls) > 1:
                raise QueueFull(1)
            real(job)

        batcher.submit = submit
        before = await _metric(c, "cmserve_rejected_total")
        out = await _one(c, model="a", n=12, seed=40, quality="fast", on_reject="resample", max_attempts=3)
        assert len(calls) == 2 and calls[0] == 12 and calls[1] < 12  # one re-draw of the rejected
        assert len(out["data"]) == 12 and all(d["attempts"] == 1 for d in out["data"])
        assert not all(d["accepted"] for d in out["data"])  # answered with what it had
        assert await _metric(c, "cmserve_rejected_total") == before
