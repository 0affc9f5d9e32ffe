"""A prompted latent consistency model (tiny random LCM pipeline) served beside the MNIST-style
model: prompts in a batch, the text-embedding cache, truncation, and bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from server.settings import Settings  # noqa: E402
from tests.models.lcm_fixtures import MAX_TOKENS, save_lcm_dir  # noqa: E402
from tests.server.helpers import app_client  # noqa: E402


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lcm_dir(tmp_path_factory.mktemp("lcm") / "tiny-lcm")


def _settings(lcm: Path, ckpt: Path) -> Settings:
    return Settings(models=[f"lcm={lcm}", f"mnist={ckpt}"], buckets=[1, 2, 4], max_batch_size=4)


async def _gen(c: Any, **body: Any) -> dict[str, Any]:
    r = await c.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_prompted_and_class_models_side_by_side(lcm_dir: Path, tiny_ckpt: Path) -> None:
    async with app_client(_settings(lcm_dir, tiny_ckpt)) as (c, app):
        cards = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        assert (cards["lcm"]["conditioning"], cards["mnist"]["conditioning"]) == ("text", "class")
        assert cards["lcm"]["family"] == "latent" and cards["lcm"]["image_size"] == 16
        alone = {
            p: [d["b64_json"] for d in (await _gen(c, model="lcm", prompt=p, n=2, seed=5))["data"]]
            for p in ("red cube", "blue ball")
        }
        assert alone["red cube"] != alone["blue ball"]  # the prompt reaches the network
        # the same requests sent together share batches, prompts mixed: the same images
        together = await asyncio.gather(
            *(_gen(c, model="lcm", prompt=p, n=2, seed=5) for p in ("red cube", "blue ball")),
            _gen(c, model="mnist", class_label=3, seed=5),
        )
        assert [d["b64_json"] for d in together[0]["data"]] == alone["red cube"]
        assert [d["b64_json"] for d in together[1]["data"]] == alone["blue ball"]
        assert together[0]["prompt_truncated"] is False and together[2]["prompt_truncated"] is None
        # guidance changes the image; the OpenAI route reads the prompt whole for this model
        other_w = await _gen(c, model="lcm", prompt="red cube", n=2, seed=5, guidance_scale=2.0)
        assert [d["b64_json"] for d in other_w["data"]] != alone["red cube"]
        r = await c.post("/v1/images/generations", json={"model": "lcm", "prompt": "red cube", "seed": 5})
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"] == alone["red cube"][0]
        text = (await c.get("/metrics")).text
        lookups = {
            line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("cmserve_text_cache_lookups_total")
        }  # fmt: skip
        # misses: red cube, blue ball, red cube at w = 2; hits: every other request
        assert lookups == {"miss": 3.0, "hit": 3.0}


async def test_long_prompts_are_truncated_and_say_so(lcm_dir: Path, tiny_ckpt: Path) -> None:
    async with app_client(_settings(lcm_dir, tiny_ckpt)) as (c, _):
        window = " ".join(["x"] * (MAX_TOKENS - 2))  # a token per one-letter word, plus start and end
        fits = await _gen(c, model="lcm", prompt=window, seed=1)
        cut = await _gen(c, model="lcm", prompt=window + " y z", seed=1)
        assert fits["prompt_truncated"] is False and cut["prompt_truncated"] is True
        assert cut["data"][0]["b64_json"] == fits["data"][0]["b64_json"]  # the tail was dropped


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "lcm"}, "prompt", "prompt_required"),
        ({"model": "lcm", "prompt": "   "}, "prompt", "prompt_required"),
        ({"model": "lcm", "prompt": "a", "class_label": 1}, "class_label", "prompt_required"),
        ({"model": "lcm", "prompt": "a", "guidance_scale": 99}, "guidance_scale", "invalid_value"),
        ({"model": "mnist", "prompt": "a cat", "class_label": 1}, "prompt", "not_prompted"),
        ({"model": "mnist", "class_label": 1, "guidance_scale": 2}, "guidance_scale", "not_prompted"),
    ],
)
async def test_prompt_mistakes_are_422(
    lcm_dir: Path, tiny_ckpt: Path, body: dict[str, Any], param: str, code: str
) -> None:
    async with app_client(_settings(lcm_dir, tiny_ckpt)) as (c, app):
        r = await c.post("/v1/generate", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
        assert r.json()["error"]["code"] == code
        r = await c.post("/v1/images/interpolations", json={"model": "lcm", "seed": 1, "seed_b": 2})
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_model"
        assert app.state.cm.batcher.batches_run == 0


async def test_prompted_model_through_a_front_end_process(lcm_dir: Path, tiny_ckpt: Path) -> None:
    """--frontends: the text row is looked up (and pinned, then released) in the engine process
    on the front end's behalf; the images are those the engine process's own app serves."""
    from tests.server.test_frontends import linked

    async with linked(_settings(lcm_dir, tiny_ckpt)) as (ec, eapp, fc, _fapp):
        mine = await _gen(fc, model="lcm", prompt="red cube", n=2, seed=5)
        theirs = await _gen(ec, model="lcm", prompt="red cube", n=2, seed=5)
        assert [d["b64_json"] for d in mine["data"]] == [d["b64_json"] for d in theirs["data"]]
        assert mine["prompt_truncated"] is False
        table = eapp.state.cm.engine.get("lcm").model.conditions
        for _ in range(100):  # the release travels as a message after the answer
            if not any(table._pins):
                break
            await asyncio.sleep(0.01)
        assert not any(table._pins)


async def test_step_batching_serves_a_prompted_model_with_the_same_images(
    lcm_dir: Path, tiny_ckpt: Path
) -> None:
    """--batching step: rows of the prompted model join and leave evaluation by evaluation and
    are decoded as they finish; each image is the one request batching serves."""
    bodies = [
        {"model": "lcm", "prompt": "red cube", "n": 2, "seed": 5, "steps": 4},
        {"model": "lcm", "prompt": "blue ball", "n": 1, "seed": 9, "steps": 2, "guidance_scale": 2.0},
        {"model": "mnist", "class_label": 3, "seed": 5},
    ]
    async with app_client(_settings(lcm_dir, tiny_ckpt)) as (c, _):
        want = [[d["b64_json"] for d in (await _gen(c, **b))["data"]] for b in bodies]
    s = _settings(lcm_dir, tiny_ckpt).model_copy(update={"batching": "step"})
    async with app_client(s) as (c, _):
        got = await asyncio.gather(*(_gen(c, **b) for b in bodies))  # mixed in flight
    assert [[d["b64_json"] for d in g["data"]] for g in got] == want


async def test_a_full_text_table_is_a_429_not_a_500(lcm_dir: Path, tiny_ckpt: Path) -> None:
    """Every text row pinned by a queued request: a new prompt is told to back off (429,
    Retry-After), in one process and through a front end; once rows are free it is served."""
    from tests.server.test_frontends import linked

    async with linked(_settings(lcm_dir, tiny_ckpt)) as (ec, eapp, fc, _fapp):
        table = eapp.state.cm.engine.get("lcm").model.conditions
        held = [eapp.state.cm.engine.call(table.acquire, f"p{i}", 8.5)[0] for i in range(len(table._pins))]
        for c in (ec, fc):
            r = await c.post("/v1/generate", json={"model": "lcm", "prompt": "a new prompt", "seed": 1})
            assert r.status_code == 429 and r.json()["error"]["code"] == "text_cache_full", r.text
            assert r.headers["retry-after"] == "1"
        for row in held:
            table.release(row)
        await _gen(fc, model="lcm", prompt="a new prompt", seed=1)
