"""The OpenAI Images API, called through the official `openai` package against a live server."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import openai
import pytest

from tests.procs import serve_process

pytestmark = pytest.mark.slow


def test_sdk_images_equal_v1_generate_and_errors_surface(tiny_ckpt: Path, tmp_path: Path) -> None:
    with serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1,4", tmp=tmp_path) as sp:
        client = openai.OpenAI(base_url=sp.url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        res = client.images.generate(
            model=model, prompt="7", n=4, response_format="b64_json", extra_body={"seed": 1}
        )
        ours = httpx.post(sp.url + "/v1/generate", json={"class_label": 7, "n": 4, "seed": 1}).json()
        assert [d.b64_json for d in res.data] == [d["b64_json"] for d in ours["data"]]
        assert all(base64.b64decode(d.b64_json)[:8] == b"\x89PNG\r\n\x1a\n" for d in res.data)
        assert res.data[0].revised_prompt == "7"
        # the class by number word and by extra_body, steps through extra_body
        words = client.images.generate(prompt="Seven", n=1, extra_body={"seed": 1})
        assert words.data[0].b64_json == res.data[0].b64_json
        two = client.images.generate(prompt="x", extra_body={"class_label": 7, "seed": 1, "steps": 2})
        assert two.data[0].b64_json == res.data[0].b64_json
        # errors become the SDK's exceptions, carrying the server's message
        with pytest.raises(openai.BadRequestError, match="names no class of this model; accepted"):
            client.images.generate(prompt="a banana")
        with pytest.raises(openai.BadRequestError, match="b64_json"):
            client.images.generate(prompt="3", response_format="url")
        with pytest.raises(openai.BadRequestError, match="steps must be one of"):
            client.images.generate(prompt="3", extra_body={"steps": 7})
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.images.generate(prompt="3", model="dall-e-3")
        with pytest.raises(openai.BadRequestError, match="size must be '28x28'"):
            client.images.generate(prompt="3", size="1024x1024")


def test_sdk_api_key(tiny_ckpt: Path, tmp_path: Path) -> None:
    args = ("--checkpoint", str(tiny_ckpt), "--buckets", "1")
    with serve_process(*args, tmp=tmp_path, env={"CMSERVE_API_KEYS": "sekret"}) as sp:
        good = openai.OpenAI(base_url=sp.url + "/v1", api_key="sekret", max_retries=0)
        assert len(good.images.generate(prompt="0").data) == 1
        bad = openai.OpenAI(base_url=sp.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.images.generate(prompt="0")
