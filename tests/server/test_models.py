"""Several models in one server: a TrigFlow checkpoint beside diffusers consistency models (the
edm family), through the whole HTTP path, eager on the CPU."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.procs import sample_sum
from models.load import load_model
from models.sampler import consistency_sample
from server.settings import Settings
from tests.models.diffusers_fixtures import save_cm_dir
from tests.server.helpers import app_client

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def cm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cm")
    card = {"name": "cd-tiny", "classes": ["cat", "dog", "fox"], "schedules": {"1": [0], "2": [22, 0]}}
    return {"cond": save_cm_dir(root / "cond", 3, card), "uncond": save_cm_dir(root / "uncond", None, seed=1)}


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _settings(tiny_ckpt: Path, cm_dirs: dict[str, Path]) -> Settings:
    return Settings(
        models=[f"mnist={tiny_ckpt}", f"cd={cm_dirs['cond']}", str(cm_dirs["uncond"])],
        buckets=[1, 2, 4],
        max_batch_size=4,
    )


async def test_three_models_served_side_by_side(tiny_ckpt: Path, cm_dirs: dict[str, Path]) -> None:
    async with app_client(_settings(tiny_ckpt, cm_dirs)) as (c, app):
        models = (await c.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["mnist", "cd", "uncond"]
        assert [m["default"] for m in models] == [True, False, False]
        assert [m["family"] for m in models] == ["trigflow", "edm", "edm"]
        cd = models[1]
        assert cd["classes"] == ["cat", "dog", "fox"] and cd["supported_steps"] == [1, 2]
        assert cd["image_size"] == 8 and cd["channels"] == 3 and not cd["unconditional"]
        assert cd["time"] == "sigma" and models[2]["classes"] == [] and models[2]["unconditional"]

        # the default model answers requests that name none
        r = await c.post("/v1/generate", json={"class_label": 3, "seed": 5})
        assert r.status_code == 200 and r.json()["model"] == "mnist"
        assert _png(r.json()["data"][0]["b64_json"]).shape == (28, 28)

        # the edm model's PNG is what its own sampler gives for the image's seed
        r = await c.post(
            "/v1/generate", json={"model": "cd", "class_label": 1, "seed": 9, "steps": 2, "n": 2}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "cd" and body["steps"] == 2
        model, info = load_model(cm_dirs["cond"])
        noise = torch.stack(
            [torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (9, 10)], 1
        )
        with torch.no_grad():
            x0 = consistency_sample(model, noise, torch.tensor([1, 1]), torch.tensor(info.schedules[2]))
        want = info.to_uint8(x0)
        for i in range(2):
            assert np.array_equal(_png(body["data"][i]["b64_json"]), want[i])

        r = await c.post("/v1/generate", json={"model": "uncond", "seed": 1})
        assert r.status_code == 200 and _png(r.json()["data"][0]["b64_json"]).shape == (8, 8, 3)

        # a colour model colorizes: the output's luma is the gray input's (to the uint8 step)
        gray = (np.arange(64).reshape(8, 8) * 3 + 30).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(gray, "L").save(buf, format="PNG")
        body = {
            "model": "uncond",
            "mode": "colorize",
            "image": base64.b64encode(buf.getvalue()).decode(),
            "seed": 3,
        }
        r = await c.post("/v1/images/edits", json=body)
        assert r.status_code == 200, r.text
        rgb = _png(r.json()["data"][0]["b64_json"]).astype(float)
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        unclipped = ((rgb > 0) & (rgb < 255)).all(-1)
        assert unclipped.sum() > 16 and np.abs(luma - gray)[unclipped].max() <= 1.0

        # the OpenAI route picks the model by its id too, and reads the class from the prompt
        r = await c.post("/v1/images/generations", json={"model": "cd", "prompt": "fox", "seed": 3})
        assert r.status_code == 200 and r.json()["data"][0]["revised_prompt"] == "fox"

        metrics = (await c.get("/metrics")).text
        for name, family in (("mnist", "trigflow"), ("cd", "edm"), ("uncond", "edm")):
            assert sample_sum(metrics, "cmserve_model_memory_bytes", model=name, part="weights") > 1000
            assert sample_sum(metrics, "cmserve_model_info", model=name, family=family) == 1
        assert 'cmserve_images_generated_total{model="cd"} 3.0' in metrics
        assert 'cmserve_batch_compute_seconds_count{model="uncond",steps="2"} 2.0' in metrics
        assert 'cmserve_runner_executions_total{mode="eager",model="cd"}' in metrics


async def test_requests_that_do_not_fit_their_model_get_clear_errors(
    tiny_ckpt: Path, cm_dirs: dict[str, Path]
) -> None:
    async with app_client(_settings(tiny_ckpt, cm_dirs)) as (c, app):
        r = await c.post("/v1/generate", json={"model": "sdxl"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "['cd', 'mnist', 'uncond']" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", json={"model": "cd"})  # no unconditional mode
        assert r.status_code == 422 and r.json()["error"]["code"] == "class_required"
        r = await c.post("/v1/generate", json={"model": "cd", "class_label": 3})
        assert r.status_code == 422 and "[0, 2]" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", json={"model": "uncond", "class_label": 0})
        assert r.status_code == 422 and "unconditional" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", json={"model": "cd", "class_label": 0, "steps": 4})
        assert r.status_code == 422 and r.json()["error"]["param"] == "steps"
        r = await c.post("/v1/images/generations", json={"model": "cd", "prompt": "seven"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_class"
        r = await c.post("/v1/images/generations", json={"model": "cd", "prompt": "fox", "size": "28x28"})
        assert r.status_code == 400 and "'8x8'" in r.json()["error"]["message"]
        r = await c.post("/v1/images/generations", json={"model": "gpt-image-1", "prompt": "fox"})
        assert r.status_code == 404
        assert app.state.cm.batcher.batches_run == 0  # none of it reached a model


def test_bad_model_flags_fail_at_start(tiny_ckpt: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from models.checkpoint import CheckpointError
    from server.engine import Engine
    from server.metrics import Metrics

    with pytest.raises(ValidationError, match="unique"):
        Settings(models=[f"a={tiny_ckpt}", f"a={tiny_ckpt}"])
    with pytest.raises(ValidationError, match="NAME=PATH"):
        Settings(models=[f"={tiny_ckpt}"])
    with pytest.raises(ValueError, match="two models are named"):
        Engine(Settings(models=[str(tiny_ckpt), str(tiny_ckpt)]), Metrics())
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="understands"):
        Engine(Settings(models=[f"x={tmp_path / 'd'}"]), Metrics())
    assert Settings(_env_file=None, models="a=x,b=y").model_paths() == [("a", Path("x")), ("b", Path("y"))]  # type: ignore[call-arg]
