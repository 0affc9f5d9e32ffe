"""The HTTP API through httpx's ASGI transport: happy path, every bad-input case, readiness,
fault isolation."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from server.settings import Settings
from tests.server.helpers import app_client


def _settings(ckpt: Path, **kw: object) -> Settings:
    return Settings(checkpoint=str(ckpt), buckets=[1, 2, 4, 8], max_batch_size=8, **kw)


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


async def test_generate_returns_decodable_pngs_and_is_deterministic(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        body = {"class_label": 7, "n": 4, "seed": 1}
        r1 = await c.post("/v1/generate", json=body)
        r2 = await c.post("/v1/generate", json=body)
        assert r1.status_code == 200, r1.text
        j1, j2 = r1.json(), r2.json()
        assert j1["model"] == "placeholder-untrained" and j1["steps"] == 2
        assert [d["seed"] for d in j1["data"]] == [1, 2, 3, 4]
        assert all(d["class_label"] == 7 for d in j1["data"])
        imgs = [_png(d["b64_json"]) for d in j1["data"]]
        assert all(i.shape == (28, 28) and i.dtype == np.uint8 for i in imgs)
        assert all(
            np.array_equal(_png(a["b64_json"]), _png(b["b64_json"])) for a, b in zip(j1["data"], j2["data"])
        )
        assert not np.array_equal(imgs[0], imgs[1])
        assert set(j1["timings_ms"]) == {"queue", "compute", "encode", "total"}
        assert r1.headers["x-request-id"]
        # image i of a request equals the n=1 request with seed + i
        r3 = await c.post("/v1/generate", json={"class_label": 7, "seed": 3})
        assert np.array_equal(_png(r3.json()["data"][0]["b64_json"]), imgs[2])


async def test_random_seed_is_returned_and_reproduces(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        r = (await c.post("/v1/generate", json={"class_label": None, "steps": 1})).json()
        seed = r["data"][0]["seed"]
        assert 0 <= seed < 2**53  # exact as a JavaScript number
        many = (await c.post("/v1/generate", json={"n": 4, "steps": 1})).json()
        assert all(d["seed"] < 2**53 for d in many["data"])
        again = (await c.post("/v1/generate", json={"seed": seed, "steps": 1})).json()
        assert again["data"][0]["b64_json"] == r["data"][0]["b64_json"]
        assert r["data"][0]["class_label"] is None


async def test_png_response_with_accept_header(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        r = await c.post("/v1/generate", json={"class_label": 2, "seed": 5}, headers={"accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-seed"] == "5" and "compute;dur=" in r.headers["server-timing"]
        assert Image.open(io.BytesIO(r.content)).size == (28, 28)
        j = (await c.post("/v1/generate", json={"class_label": 2, "seed": 5})).json()
        assert base64.b64decode(j["data"][0]["b64_json"]) == r.content
        r = await c.post("/v1/generate", json={"n": 2}, headers={"accept": "image/png"})
        assert r.status_code == 406


BAD = [
    ({"class_label": 10}, 422, "class_label"),
    ({"class_label": -1}, 422, "class_label"),
    ({"n": 0}, 422, "n"),
    ({"n": 17}, 422, "n"),
    ({"steps": 0}, 422, "steps"),
    ({"steps": 5}, 422, "steps"),
    ({"n": "4"}, 422, "n"),
    ({"n": 1.5}, 422, "n"),
    ({"seed": 1.5}, 422, "seed"),
    ({"seed": -3}, 422, "seed"),
    ({"seed": 2**62 + 1}, 422, "seed"),
    ({"steps": 2.5}, 422, "steps"),
    ({"n": True}, 422, "n"),
    ({"class_label": "7"}, 422, "class_label"),
    ({"class_label": True}, 422, "class_label"),
    ({"response_format": "url"}, 422, "response_format"),
    ({"timeout_s": 0}, 422, "timeout_s"),
    ({"prompt": "a cat"}, 422, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
async def test_bad_fields_get_4xx_and_never_reach_the_model(
    tiny_ckpt: Path, body: dict, status: int, param: str
) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        r = await c.post("/v1/generate", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"]
        assert r.json()["request_id"] == r.headers["x-request-id"]
        assert app.state.cm.batcher.batches_run == 0


@pytest.mark.parametrize(
    ("content", "ctype", "status"),
    [
        (b'{"class_label": 7,', "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b'{"class_label": 7}', "text/plain", 415),
        (b"class_label=7", "application/x-www-form-urlencoded", 415),
        (b'{"class_label": 7, "pad": "' + b"x" * 20000 + b'"}', "application/json", 413),
    ],
)
async def test_malformed_bodies_get_4xx(tiny_ckpt: Path, content: bytes, ctype: str, status: int) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        r = await c.post("/v1/generate", content=content, headers={"content-type": ctype})
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
        assert app.state.cm.batcher.batches_run == 0


async def test_oversized_chunked_body_without_length_gets_413(tiny_ckpt: Path) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b" " * 1000

    async with app_client(_settings(tiny_ckpt)) as (c, _):
        r = await c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_models_card_and_health(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["id"] == "placeholder-untrained" and card["placeholder"] is True
        assert card["supported_steps"] == [1, 2, 3, 4] and card["image_size"] == 28
        assert len(card["classes"]) == 10
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        assert (await c.get("/nope")).status_code == 404


@pytest.mark.parametrize(("default_steps", "expect"), [(None, 2), (4, 4)])
async def test_omitted_steps_get_the_cards_default(
    tiny_ckpt: Path, tmp_path: Path, default_steps: int | None, expect: int
) -> None:
    """A request without `steps` runs the card's `default_steps` (2 where the card names none)."""
    import json
    import shutil

    ckpt = tmp_path / "m.json"
    shutil.copy(tiny_ckpt, ckpt)
    shutil.copy(tiny_ckpt.with_suffix(".safetensors"), tmp_path / "tiny.safetensors")  # the card names it
    raw = json.loads(ckpt.read_text())
    if default_steps is not None:
        raw["default_steps"] = default_steps
    ckpt.write_text(json.dumps(raw))
    async with app_client(_settings(ckpt)) as (c, _):
        assert (await c.get("/v1/models")).json()["data"][0]["default_steps"] == expect
        r = await c.post("/v1/generate", json={"seed": 1})
        assert r.status_code == 200 and r.json()["steps"] == expect
        same = await c.post("/v1/generate", json={"seed": 1, "steps": expect})
        assert same.json()["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]


async def test_readiness_waits_for_warmup(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine import Engine

    release = threading.Event()
    orig = Engine.warmup

    def slow_warmup(self: Engine) -> float:
        release.wait(10)
        return orig(self)

    monkeypatch.setattr(Engine, "warmup", slow_warmup)
    async with app_client(_settings(tiny_ckpt), wait_ready=False) as (c, app):
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200
        r = await c.post("/v1/generate", json={})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        release.set()
        for _ in range(3000):
            if (await c.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await c.get("/readyz")).status_code == 200
        assert len(app.state.cm.engine.runner.slots) == 4 * 4  # every bucket x every step count
        assert (await c.post("/v1/generate", json={})).status_code == 200


@pytest.mark.parametrize("fault", ["raise", "nan"])
async def test_a_failing_batch_gets_500_and_the_next_one_works(tiny_ckpt: Path, fault: str) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        # faults injected by wrapping the engine's noise (run_batch draws it through
        # self.make_noise): the first batch raises, or samples from a NaN and so comes back
        # non-finite from the device-side check; the next is served as usual
        engine = app.state.cm.engine
        make_noise, calls = engine.make_noise, {"n": 0}

        def faulty(steps, seeds, model=None, edits=None):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1 and fault == "raise":
                raise RuntimeError("secret internal detail")
            z = make_noise(steps, seeds, model, edits)
            if calls["n"] == 1:
                z[:, 0].fill_(float("nan"))
            return z

        engine.make_noise = faulty
        r = await c.post("/v1/generate", json={"seed": 1}, headers={"x-request-id": "req-123"})
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "req-123" and r.json()["request_id"] == "req-123"
        assert "secret" not in r.text and "Traceback" not in r.text
        ok = await c.post("/v1/generate", json={"seed": 1})
        assert ok.status_code == 200
        metrics = (await c.get("/metrics")).text
        reason = "exception" if fault == "raise" else "nonfinite"
        assert f'cmserve_batch_failures_total{{reason="{reason}"}} 1.0' in metrics


async def test_load_warmup_and_batches_share_one_compute_thread(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every torch call on one thread: a second thread running torch CPU ops gets its own OpenMP
    team, which slowed batches 1.5-4x on 2 cores (server/engine.py)."""
    from server.engine import Engine
    from server.runner import SamplerRunner

    seen: dict[str, set[int]] = {"load": set(), "warmup": set(), "batch": set()}
    orig_load, orig_warm = Engine._load, SamplerRunner.warmup

    def load(self: Engine) -> None:
        seen["load"].add(threading.get_ident())
        orig_load(self)

    def warm(self: SamplerRunner, steps: list[int]) -> None:
        seen["warmup"].add(threading.get_ident())
        orig_warm(self, steps)

    monkeypatch.setattr(Engine, "_load", load)
    monkeypatch.setattr(SamplerRunner, "warmup", warm)
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        engine = app.state.cm.engine
        make_noise = engine.make_noise  # run_batch draws its noise through it

        def recorded(*args):  # type: ignore[no-untyped-def]
            seen["batch"].add(threading.get_ident())
            return make_noise(*args)

        engine.make_noise = recorded
        rs = await asyncio.gather(*(c.post("/v1/generate", json={"seed": i}) for i in range(6)))
        assert all(r.status_code == 200 for r in rs)
    threads = seen["load"] | seen["warmup"] | seen["batch"]
    assert len(threads) == 1 and all(seen.values()), seen
    assert threading.get_ident() not in threads  # never the event loop's thread


async def test_max_batch_size_zero_is_chosen_at_warmup(tiny_ckpt: Path) -> None:
    async with app_client(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 2, 4], max_batch_size=0)) as (
        c,
        app,
    ):
        chosen = app.state.cm.batcher.max_batch_size
        assert chosen in (1, 2, 4)
        assert f"cmserve_max_batch_size_images {float(chosen)}" in (await c.get("/metrics")).text
    async with app_client(_settings(tiny_ckpt)) as (c, app):  # a set value is kept
        assert app.state.cm.batcher.max_batch_size == 8


async def test_ops_port_serves_health_readiness_and_metrics(tiny_ckpt: Path) -> None:
    from bench.procs import free_port

    port = free_port()
    settings = _settings(tiny_ckpt, ops_port=port, api_keys=["k"], protect_ops_endpoints=True)
    async with app_client(settings) as (c, app):
        ops = f"http://127.0.0.1:{port}"
        auth = {"authorization": "Bearer k"}
        async with httpx.AsyncClient(base_url=ops, timeout=5) as o:

            async def settles(path: str, code: int) -> httpx.Response:
                """The ops process answers from a snapshot at most PUBLISH_S old."""
                for _ in range(40):
                    r = await o.get(path, headers=auth)
                    if r.status_code == code:
                        break
                    await asyncio.sleep(0.1)
                return r

            assert (await o.get("/healthz")).status_code == 401  # protected like the main port's
            assert (await o.get("/healthz", headers=auth)).json() == {"status": "ok"}
            r = await settles("/readyz", 200)
            assert (r.status_code, r.json()) == (200, {"status": "ready"})
            m = await o.get("/metrics", headers=auth)
            assert m.status_code == 200 and "cmserve_ready 1.0" in m.text
            assert m.headers["content-type"].startswith("text/plain")
            assert (await o.get("/v1/models", headers=auth)).status_code == 404
            app.state.cm.begin_drain()
            r = await settles("/readyz", 503)
            assert (r.status_code, r.json()) == (503, {"status": "draining"})


async def test_ops_liveness_fails_when_the_event_loop_hangs(tiny_ckpt: Path) -> None:
    """The ops process says 503 on /healthz once the server's event loop has not run for
    stall_s, and 200 again when it runs; it goes away with the server."""
    from bench.procs import free_port
    from server.deps import ServerState
    from server.metrics import Metrics
    from server.ops_listener import OpsServer

    port = free_port()
    st = ServerState(_settings(tiny_ckpt), Metrics())
    ops = OpsServer(st, "127.0.0.1", port, stall_s=0.6).start()
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        assert httpx.get(url, timeout=2).status_code == 200
        seen: list[int] = []

        def two_probes() -> None:  # at once, and 1.5 s into the hang
            seen.append(httpx.get(url, timeout=2).status_code)
            time.sleep(1.5)
            seen.append(httpx.get(url, timeout=2).status_code)

        probe = threading.Thread(target=two_probes)
        probe.start()
        time.sleep(2.0)  # the event loop hangs (this coroutine blocks it)
        probe.join()
        assert seen == [200, 503]
        await asyncio.sleep(1.0)  # the loop runs again: the next snapshot carries a fresh beat
        assert httpx.get(url, timeout=2).status_code == 200
    finally:
        ops.stop()
    assert not ops.proc.is_alive()


async def test_one_validation_vocabulary(tiny_ckpt: Path) -> None:
    """The same kind of mistake answers alike: code, status, wording; every field at fault listed."""
    async with app_client(_settings(tiny_ckpt)) as (c, app):

        async def err(body: object, **headers: str) -> tuple[int, dict]:  # type: ignore[type-arg]
            r = await c.post("/v1/generate", json=body, headers=headers)
            return r.status_code, r.json()["error"]

        low, high = await err({"n": 0}), await err({"n": 17})
        assert low[0] == high[0] == 422 and low[1]["code"] == high[1]["code"] == "invalid_value"
        assert low[1]["message"] == "n: Input should be greater than or equal to 1"
        assert high[1]["message"] == "n: Input should be less than or equal to 16"
        status, e = await err({"n": "4"})
        assert status == 422 and e["message"] == "n: must be an integer"  # no "Value error, " prefix
        # a bad deadline: the body's field and the header answer alike
        body_bad, header_bad = (
            await err({"timeout_s": "soon"}),
            await err({}, **{"x-request-timeout": "soon"}),
        )
        assert body_bad[0] == header_bad[0] == 422 and header_bad[1]["param"] == "x-request-timeout"
        assert body_bad[1]["code"] == header_bad[1]["code"] == "invalid_value"
        # every field at fault is listed, the first also in message/param
        status, e = await err({"n": 0, "seed": -1, "colour": "red"})
        assert status == 422 and {x["param"] for x in e["errors"]} == {"n", "seed", "colour"}
        assert e["param"] == e["errors"][0]["param"]
        # an Accept the route cannot satisfy, and a trailing slash
        r = await c.post("/v1/generate", json={}, headers={"accept": "image/webp"})
        assert r.status_code == 406 and r.json()["error"]["code"] == "not_acceptable"
        r = await c.post("/v1/generate/", json={})
        assert r.status_code == 404
        assert app.state.cm.batcher.batches_run == 0


@pytest.mark.parametrize(
    ("path", "ctype"),
    [("/v1/generate", b"application/json"), ("/v1/images/generations", b"application/json"),
     ("/v1/images/edits", b"application/json"), ("/v1/images/edits", b"multipart/form-data; boundary=xyz")],
)  # fmt: skip
async def test_client_gone_before_its_body_arrived_is_a_499_not_a_server_error(
    tiny_ckpt: Path, path: str, ctype: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up mid-upload is counted as a 499 like one that leaves while queued:
    not a 500 (which would page whoever alerts on the 5xx rate), no traceback in the log."""
    async with app_client(_settings(tiny_ckpt)) as (c, app):
        messages = iter([
            {"type": "http.request", "body": b'--xyz\r\nContent-Disposition: form', "more_body": True},
            {"type": "http.disconnect"},
        ])  # fmt: skip
        sent: list[dict] = []

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", ctype), (b"content-length", b"100")],
            "client": ("127.0.0.1", 5555), "server": ("test", 80),
        }  # fmt: skip
        await app(scope, receive, send)
        body = (await c.get("/metrics")).text
    assert f'cmserve_requests_total{{code="499",route="{path}"}} 1.0' in body
    assert 'code="500"' not in body
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    assert app.state.cm.batcher.batches_run == 0


def test_every_process_serves_http_with_the_c_parser_and_libuv_loop(tiny_ckpt: Path) -> None:
    """uvicorn's "auto" takes httptools and uvloop only when they are installed; they are
    dependencies (pyproject), so the config every cmserve process runs resolves to them, not to
    the pure-Python h11 parser and asyncio's loop (docs/performance.md: what h11 costs)."""
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from server.app import create_app, uvicorn_config

    s = _settings(tiny_ckpt)
    cfg = uvicorn_config(create_app(s), s)
    cfg.load()
    assert cfg.http_protocol_class is HttpToolsProtocol
    factory = cfg.get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
