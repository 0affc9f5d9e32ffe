"""The serving routes' short path (server/hot_routes.py) answers exactly as FastAPI's route
does: the same app is driven with and without it, request by request."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import generate as generate_mod
from server.hot_routes import without_hot_routes
from server.settings import Settings
from tests.server.helpers import app_client
from tests.server.test_edits import DIGIT as DIGIT_PIXELS
from tests.server.test_edits import MASK as MASK_PIXELS
from tests.server.test_edits import png

KEY = {"authorization": "Bearer k1"}
JSON = {"content-type": "application/json", **KEY}


DIGIT, MASK = png(DIGIT_PIXELS), png(MASK_PIXELS)


def _multipart(files: dict[str, bytes], data: dict[str, str]) -> tuple[dict[str, str], bytes]:
    req = httpx.Request(
        "POST", "http://x", files={k: (f"{k}.png", v, "image/png") for k, v in files.items()}, data=data
    )
    return {"content-type": req.headers["content-type"], **KEY}, req.read()


def _edit_json(**fields: object) -> bytes:
    body = {"image": base64.b64encode(DIGIT).decode(), "mask": base64.b64encode(MASK).decode(), **fields}
    return json.dumps(body).encode()


EDIT_FORM = _multipart({"image": DIGIT, "mask": MASK}, {"n": "2", "seed": "4", "steps": "2"})

# (method, path, headers, body): successes, every kind of refusal the handlers raise, and what
# the short path must leave to FastAPI (other methods, other paths)
CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/v1/generate", JSON, b'{"class_label": 3, "seed": 11, "n": 2}'),
    ("POST", "/v1/generate", {**JSON, "accept": "image/png"}, b'{"class_label": 3, "seed": 11}'),
    ("POST", "/v1/generate", {**JSON, "accept": "image/png"}, b'{"seed": 11, "n": 2}'),
    ("POST", "/v1/generate", {"content-type": "application/json"}, b'{"seed": 1}'),
    ("POST", "/v1/generate", {**JSON, "authorization": "Bearer nope"}, b'{"seed": 1}'),
    ("POST", "/v1/generate", {**KEY, "content-type": "text/plain"}, b'{"seed": 1}'),
    ("POST", "/v1/generate", JSON, b'{"seed": 1,'),
    ("POST", "/v1/generate", JSON, b'{"n": 0, "steps": 9, "colour": 1}'),
    ("POST", "/v1/generate", JSON, b'{"model": "nope"}'),
    ("POST", "/v1/generate", {**JSON, "x-request-timeout": "soon"}, b"{}"),
    ("POST", "/v1/generate", JSON, b'{"pad": "' + b"x" * 9000 + b'"}'),
    ("GET", "/v1/generate", KEY, b""),
    ("POST", "/v1/generate/", JSON, b"{}"),
    ("POST", "/v1/images/generations", JSON, b'{"prompt": "seven", "seed": 5}'),
    ("POST", "/v1/images/generations", JSON, b'{"prompt": "a giraffe"}'),
    ("POST", "/v1/images/generations", JSON, b'{"prompt": "3", "response_format": "url"}'),
    ("PUT", "/v1/images/generations", JSON, b"{}"),
    ("POST", "/v1/images/edits", *EDIT_FORM),
    ("POST", "/v1/images/edits", EDIT_FORM[0], EDIT_FORM[1][:-40]),
    ("POST", "/v1/images/edits", *_multipart({"image": DIGIT, "photo": MASK}, {})),
    ("POST", "/v1/images/edits", JSON, _edit_json(seed=3, n=2)),
    ("POST", "/v1/images/edits", JSON, _edit_json(mode="sharpen")),
    ("POST", "/v1/images/edits", JSON, b'{"image": "not a png"}'),
    ("POST", "/v1/images/interpolations", JSON, b'{"seed": 1, "seed_b": 2, "frames": 3}'),
    ("POST", "/v1/images/interpolations", JSON, b'{"seed": 1, "seed_b": 2, "frames": 99}'),
    ("GET", "/v1/images/interpolations", KEY, b""),
    ("POST", "/v1/models", JSON, b"{}"),
]

VARYING = {"created", "timings_ms", "request_id"}  # differ between any two calls


def _settings(ckpt: Path) -> Settings:
    return Settings(
        checkpoint=str(ckpt), buckets=[1, 2], max_batch_size=2, api_keys=["k1"], max_body_bytes=8192
    )


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VARYING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


async def _answer(
    c: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, str], Any]:
    r = await c.request(method, path, headers=headers, content=body or None)
    ctype = r.headers.get("content-type", "")
    content = _strip(r.json()) if ctype.startswith("application/json") else r.content
    kept = {"content-type", "www-authenticate", "retry-after", "allow", "x-seed", "x-model", "x-steps"}
    assert r.headers["x-request-id"]
    return r.status_code, {k: v for k, v in r.headers.items() if k in kept}, content


async def test_short_path_answers_as_the_fastapi_route(tiny_ckpt: Path) -> None:
    answers: list[list[tuple[int, dict[str, str], Any]]] = []
    for configure in (None, without_hot_routes):
        async with app_client(_settings(tiny_ckpt), configure=configure) as (c, app):
            answers.append([await _answer(c, *case) for case in CASES])
            assert app.state.cm.batcher.batches_run > 0
    hot, plain = answers
    for case, a, b in zip(CASES, hot, plain, strict=True):
        assert a == b, (case[:2], case[3][:60], a[:2], b[:2])
    # the cases cover successes and refusals of every POST route, and requests left to FastAPI
    for path in ("/v1/generate", "/v1/images/generations", "/v1/images/edits", "/v1/images/interpolations"):
        got = {a[0] for case, a in zip(CASES, hot, strict=True) if case[:2] == ("POST", path)}
        assert 200 in got and any(400 <= c < 500 for c in got), (path, got)
    codes = {a[0] for a in hot}
    assert {200, 400, 401, 404, 405, 406, 413, 415, 422} <= codes, codes


async def test_short_path_skips_fastapi_routing(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        seen: list[str] = []
        inner = app.router.__class__.__call__

        async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["path"])
            await inner(self, scope, receive, send)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(app.router.__class__, "__call__", counting)
            for path, body in (("/v1/generate", {"seed": 1}), ("/v1/images/generations", {"prompt": "1"})):
                assert (await c.post(path, json=body, headers=KEY)).status_code == 200
            assert (await c.get("/v1/models", headers=KEY)).status_code == 200
        assert seen == ["/v1/models"]


@pytest.mark.parametrize("hot", [True, False])
async def test_unexpected_error_is_a_logged_500_either_way(
    tiny_ckpt: Path, hot: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("validator bug")

    monkeypatch.setattr(generate_mod, "validate", broken)
    configure = None if hot else without_hot_routes
    async with app_client(_settings(tiny_ckpt), configure=configure, raise_app_exceptions=False) as (c, app):
        r = await c.post("/v1/generate", json={"seed": 1}, headers={**KEY, "x-request-id": "req-42"})
        assert r.status_code == 500
        assert r.json() == {
            "error": {"type": "server_error", "message": "internal server error", "param": None,
                      "code": "internal_error"},
            "request_id": "req-42",
        }  # fmt: skip
        assert "validator bug" not in r.text
        assert app.state.cm.batcher.batches_run == 0
        body = (await c.get("/metrics")).text
    assert 'cmserve_requests_total{code="500",route="/v1/generate"} 1.0' in body
    assert any("req-42" in rec.getMessage() for rec in caplog.records), json.dumps(
        [rec.getMessage() for rec in caplog.records]
    )
