"""The Python client (retries, deadline header, errors with request ids) and `cmserve generate`."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.client import AsyncClient, Client, CmserveError, RetryPolicy
from tests.procs import ROOT, serve_process

OK = {
    "model": "m",
    "steps": 2,
    "created": 1,
    "data": [{"b64_json": "iVBORw0KGgo=", "seed": 5, "class_label": 3}],
    "timings_ms": {"queue": 1.0, "compute": 2.0, "encode": 0.1, "total": 3.5},
}


def _flaky(fails: int, retry_after: str = "0.01") -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering 429 `fails` times, then 200; it records every request."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= fails:
            err = {
                "error": {"message": "queue is full; retry later", "code": "queue_full"},
                "request_id": "r",
            }
            return httpx.Response(
                429, json=err, headers={"retry-after": retry_after, "x-request-id": f"r{len(seen)}"}
            )
        return httpx.Response(200, json=OK, headers={"x-request-id": "ok-1"})

    return httpx.MockTransport(handler), seen


def test_retries_honour_retry_after_within_the_budget() -> None:
    transport, seen = _flaky(2)
    with Client("http://x", transport=transport, timeout_s=7) as c:
        res = c.generate(class_label=3, seed=5)
    assert res.attempts == 3 and len(seen) == 3 and res.request_id == "ok-1"
    assert res.seeds == [5] and res.class_label == 3 and res.timings_ms["total"] == 3.5
    assert all(r.headers["x-request-timeout"] == "7" for r in seen)
    assert json.loads(seen[0].content) == {"class_label": 3, "n": 1, "seed": 5}


def test_retries_stop_at_the_attempt_limit_and_at_the_budget() -> None:
    transport, seen = _flaky(10)
    with (
        Client("http://x", transport=transport, retry=RetryPolicy(attempts=3)) as c,
        pytest.raises(CmserveError) as e,
    ):
        c.generate()
    assert len(seen) == 3 and e.value.status == 429 and e.value.code == "queue_full"
    assert e.value.request_id == "r3" and "r3" in str(e.value)
    transport, seen = _flaky(10, retry_after="5")
    with (
        Client("http://x", transport=transport, retry=RetryPolicy(budget_s=1.0)) as c,
        pytest.raises(CmserveError),
    ):
        c.generate()
    assert len(seen) == 1  # waiting 5 s would pass the 1 s budget: answer at once


async def test_async_client_retries_too() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(
                503, json={"error": {"message": "model is loading"}}, headers={"retry-after": "0"}
            )
        return httpx.Response(200, json=OK)

    async with AsyncClient("http://x", transport=httpx.MockTransport(handler)) as c:
        res = await c.generate(class_label=3)
    assert res.attempts == 2 and res.pngs[0].startswith(b"\x89PNG")


@pytest.mark.slow
def test_client_and_cli_against_a_live_server(tiny_ckpt: Path, tmp_path: Path) -> None:
    with serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1,4", tmp=tmp_path) as sp:
        with Client(sp.url) as c:
            res = c.generate(class_label=7, n=3, seed=11, steps=2)
            raw = httpx.post(sp.url + "/v1/generate", json={"class_label": 7, "n": 3, "seed": 11}).json()
            assert res.pngs == [base64.b64decode(d["b64_json"]) for d in raw["data"]]
            three = c.generate(class_label=3, seed=5).pngs[0]
            assert res.images[0].size == (28, 28) and res.seeds == [11, 12, 13]
            with pytest.raises(CmserveError) as e:
                c.generate(class_label=99)
            assert e.value.status == 422 and e.value.request_id and "class_label" in e.value.message
        out = tmp_path / "out"
        cli = [sys.executable, "-m", "server.cli", "generate", "--url", sp.url]
        grid = tmp_path / "g.png"
        args = ["3", "-n", "20", "--seed", "5", "-o", str(out), "--grid", str(grid), "--chunk", "8"]
        p = subprocess.run([*cli, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        files = sorted(out.glob("3_*.png"))
        assert len(files) == 20 and {f.name for f in files} == {f"3_{s}.png" for s in range(5, 25)}
        assert Image.open(grid).size == (8 * 28, 3 * 28)
        assert (out / "3_5.png").read_bytes() == three
        bad = subprocess.run([*cli, "12"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "class_label must be in [0, 9]" in bad.stderr
