"""/v1/images/edits and /v1/images/interpolations over HTTP: multipart and JSON, the constraint
visible in the PNGs, clear 4xx for every bad upload, and edits sharing batches with generation."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.settings import Settings
from tests.server.helpers import app_client

TEACHER = Path(__file__).resolve().parents[2] / "models" / "weights" / "teacher-mnist.json"


def png(a: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


DIGIT = (np.arange(28 * 28).reshape(28, 28) * 7 % 256).astype(np.uint8)
MASK = np.full((28, 28, 4), 255, np.uint8)
MASK[:14, :, 3] = 0  # generate the top half, keep the bottom


def _settings(ckpt: Path, teacher: bool = False, **kw: object) -> Settings:
    models = [f"cm={ckpt}", *([f"teacher={TEACHER}"] if teacher else [])]
    return Settings(models=models, buckets=[1, 4], **kw)  # type: ignore[arg-type]


async def test_inpaint_multipart_keeps_the_known_pixels(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        files = {"image": ("d.png", png(DIGIT), "image/png"), "mask": ("m.png", png(MASK), "image/png")}
        r = await c.post(
            "/v1/images/edits", files=files, data={"n": "3", "seed": "4", "steps": "2", "class_label": "7"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (
            body["mode"] == "inpaint"
            and body["model"] == "cm"
            and [d["seed"] for d in body["data"]] == [4, 5, 6]
        )
        outs = [decode(d["b64_json"]) for d in body["data"]]
        for out in outs:
            assert np.array_equal(out[14:], DIGIT[14:])  # to the uint8 step: exactly
        assert not np.array_equal(outs[0][:14], outs[1][:14])  # seeds differ where it generates


async def test_json_variant_superres_variation_and_alpha_as_mask(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        low = (100 + np.arange(49).reshape(7, 7)).astype(np.uint8)
        r = await c.post(
            "/v1/images/edits",
            json={"image": base64.b64encode(png(low)).decode(), "mode": "superres", "seed": 1, "steps": 4},
        )
        assert r.status_code == 200, r.text
        patches = decode(r.json()["data"][0]["b64_json"]).astype(float).reshape(7, 4, 7, 4)
        means = patches.mean(axis=(1, 3))
        # the input's patch means to the uint8 step, where no pixel of the patch was clipped to 0 or 255
        unclipped = ((patches > 0) & (patches < 255)).all(axis=(1, 3))
        assert unclipped.sum() >= 10 and np.abs(means - low)[unclipped].max() <= 1.0
        r = await c.post(
            "/v1/images/edits",
            json={
                "image": base64.b64encode(png(DIGIT)).decode(),
                "mode": "variation",
                "strength": 0.2,
                "seed": 1,
            },
        )
        assert r.status_code == 200, r.text
        # an image with alpha is its own mask (OpenAI's rule): alpha 0 where to generate
        la = np.stack(
            [DIGIT, np.where(np.arange(28)[:, None] < 14, 0, 255).repeat(28, 1).astype(np.uint8)], -1
        )
        r = await c.post(
            "/v1/images/edits", json={"image": base64.b64encode(png(la, "LA")).decode(), "seed": 2}
        )
        assert r.status_code == 200, r.text
        assert np.array_equal(decode(r.json()["data"][0]["b64_json"])[14:], DIGIT[14:])


async def test_interpolation_frames(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        r = await c.post(
            "/v1/images/interpolations", json={"seed": 3, "seed_b": 8, "frames": 4, "class_label": 2}
        )
        assert r.status_code == 200, r.text
        frames = r.json()["data"]
        assert [f["alpha"] for f in frames] == pytest.approx([0, 1 / 3, 2 / 3, 1])
        for i, seed in ((0, 3), (3, 8)):  # the ends are the two seeds' own images
            g = await c.post("/v1/generate", json={"seed": seed, "class_label": 2})
            assert np.array_equal(decode(frames[i]["b64_json"]), decode(g.json()["data"][0]["b64_json"]))
        r = await c.post("/v1/images/interpolations", json={"seed": 3, "seed_b": 8, "frames": 17})
        assert r.status_code == 422 and r.json()["error"]["param"] == "frames"
        metrics = (await c.get("/metrics")).text
        assert 'cmserve_edit_images_total{mode="interpolate",model="cm"} 4.0' in metrics


async def test_an_edit_and_a_generation_share_one_batch(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, max_batch_size=4)) as (c, app):
        batcher, seen = app.state.cm.batcher, []
        orig = batcher.run_batch

        def spy(steps, labels, seeds, model=None, edits=None):  # type: ignore[no-untyped-def]
            if not seen:
                time.sleep(0.5)  # the first batch holds the worker while the others queue
            seen.append(None if edits is None else [e and e.mode for e in edits])
            return orig(steps, labels, seeds, model, edits)

        batcher.run_batch = spy
        blocker = asyncio.create_task(c.post("/v1/generate", json={"seed": 0}))
        await asyncio.sleep(0.1)
        files = {"image": ("d.png", png(DIGIT), "image/png"), "mask": ("m.png", png(MASK), "image/png")}
        edit = asyncio.create_task(c.post("/v1/images/edits", files=files, data={"seed": "1"}))
        gen = asyncio.create_task(c.post("/v1/generate", json={"seed": 2}))
        results = await asyncio.gather(blocker, edit, gen)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert seen == [None, ["inpaint", None]], seen  # one batch served the edit and the generation
        # and the generated image is the one it is alone
        alone = await c.post("/v1/generate", json={"seed": 2})
        assert (
            decode(alone.json()["data"][0]["b64_json"]).tobytes()
            == decode(results[2].json()["data"][0]["b64_json"]).tobytes()
        )


BAD_UPLOADS = [
    ({"image": DIGIT}, {"mode": "colorize"}, 422, "mode", "colorize needs a colour model"),
    ({"image": b"not a png"}, {}, 422, "image", "not a readable PNG"),
    ({"image": "jpeg"}, {}, 422, "image", "must be a PNG"),
    ({"image": np.zeros((20, 20), np.uint8)}, {}, 422, "image", "20x20, the model takes 28x28"),
    (
        {"image": np.zeros((28, 28, 3), np.uint8)},
        {},
        422,
        "image",
        "RGB PNG, but model 'cm' takes 1-channel",
    ),
    ({"image": DIGIT, "mask": np.zeros((14, 14, 4), np.uint8)}, {}, 422, "mask", "must match"),
    ({"image": DIGIT, "mask": np.zeros((28, 28), np.uint8)}, {}, 422, "mask", "needs an alpha channel"),
    (
        {"image": DIGIT, "mask": np.full((28, 28, 4), 255, np.uint8)},
        {},
        422,
        "mask",
        "nothing to generate",
    ),
    ({"image": DIGIT}, {}, 422, "mask", "required for inpaint"),
    ({}, {}, 422, "image", "required"),
    ({"image": DIGIT, "mask": MASK}, {"mode": "outpaint"}, 422, "mode", "inpaint"),
    ({"image": DIGIT, "mask": MASK}, {"n": "two"}, 422, "n", "must be a number"),
    ({"image": DIGIT, "mask": MASK}, {"n": "17"}, 422, "n", "less than or equal to 16"),
    ({"image": DIGIT, "mask": MASK}, {"strength": "2"}, 422, "strength", "less than or equal to 1"),
    ({"image": DIGIT}, {"mode": "superres"}, 422, "image", "low-resolution image of side [14, 7, 4, 2]"),
    (
        {"image": DIGIT, "mask": MASK},
        {"model": "teacher"},
        422,
        "model",
        "editing needs a consistency model",
    ),
    ({"image": DIGIT, "mask": MASK}, {"model": "nope"}, 404, "model", "not served here"),
    ({"image": DIGIT, "mask": MASK, "extra": DIGIT}, {}, 422, "extra", "unknown file field"),
]


async def test_bad_uploads_get_a_clear_4xx_naming_the_field(tiny_ckpt: Path) -> None:
    def part(v: object) -> bytes:
        if isinstance(v, bytes):
            return v
        if isinstance(v, str):  # "jpeg": a real image in the wrong format
            buf = io.BytesIO()
            Image.fromarray(DIGIT).save(buf, format="JPEG")
            return buf.getvalue()
        return png(v)  # type: ignore[arg-type]

    async with app_client(_settings(tiny_ckpt, teacher=True)) as (c, app):
        for files, data, status, param, needle in BAD_UPLOADS:
            if files:
                parts = {k: (k, part(v), "image/png") for k, v in files.items()}
                r = await c.post("/v1/images/edits", files=parts, data=data)
            else:  # JSON, without an image
                r = await c.post("/v1/images/edits", json={"seed": 1, **data})
            assert r.status_code == status, (needle, r.text)
            err = r.json()["error"]
            assert err["param"] == param and needle in err["message"], err
        assert app.state.cm.batcher.batches_run == 0  # nothing reached the model


async def test_uploads_are_bound_by_the_body_limit(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, max_body_bytes=1024)) as (c, _):
        noisy = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)  # ~800 B as PNG
        files = {"image": ("d.png", png(noisy), "image/png"), "mask": ("m.png", png(MASK), "image/png")}
        r = await c.post("/v1/images/edits", files=files)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
