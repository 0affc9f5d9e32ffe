"""Fault isolation, deadlines, disconnects and backpressure against a real server process."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import serve_process

pytestmark = pytest.mark.slow
FAULTS = "tests.reliability.fault_server"


def test_a_faulty_batch_fails_alone_with_500_and_a_request_id(tiny_ckpt: Path, tmp_path: Path) -> None:
    with (
        serve_process(
            "--checkpoint", str(tiny_ckpt), "--buckets", "1,2,4", tmp=tmp_path, module=FAULTS
        ) as sp,
        httpx.Client(base_url=sp.url, timeout=30) as c,
    ):
        for seed, reason in ((666, "exception"), (777, "nonfinite")):
            r = c.post("/v1/generate", json={"seed": seed}, headers={"x-request-id": f"fault-{seed}"})
            assert r.status_code == 500
            body = r.json()
            assert body["request_id"] == r.headers["x-request-id"] == f"fault-{seed}"
            assert (
                "internal detail" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
            )
            assert (
                c.post("/v1/generate", json={"seed": seed + 1}).status_code == 200
            )  # the next batch is fine
            assert sp.metric("cmserve_batch_failures_total", reason=reason) == 1
        log = sp.output()
        assert "fault-666" in log and "fault-777" in log  # logged with the request ids


def _send_and_hang_up(url: str, body: bytes, after_s: float) -> None:
    """Send a whole request on a raw socket, then close it without reading: a client that left."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(after_s)


def test_deadlines_and_disconnects_cost_no_compute(tiny_ckpt: Path, tmp_path: Path, batching: str) -> None:
    """One slow batch holds the worker; requests queued behind it either expire (504) or are
    abandoned by their clients: none of them reaches the sampler."""
    env = {"FAULT_SLOW_MS": "4000"}
    with (
        serve_process(
            "--checkpoint", str(tiny_ckpt), "--buckets", "1,2,4", tmp=tmp_path, module=FAULTS, env=env
        ) as sp,
        httpx.Client(base_url=sp.url, timeout=30) as c,
    ):
        rows_before = sp.metric("cmserve_batch_size_images_sum")
        with cf.ThreadPoolExecutor(32) as pool:
            blocker = pool.submit(c.post, "/v1/generate", json={"seed": 1})
            time.sleep(0.5)  # the blocker is now computing, for 4 s
            exp = [
                pool.submit(c.post, "/v1/generate", json={"seed": 100 + i, "timeout_s": 0.3})
                for i in range(8)
            ]
            gone = [
                pool.submit(_send_and_hang_up, sp.url, json.dumps({"seed": 200 + i}).encode(), 0.2)
                for i in range(16)
            ]
            for f in gone:
                f.result()
            assert [f.result().status_code for f in exp] == [504] * 8
            assert blocker.result().status_code == 200
        time.sleep(1)  # the worker runs its next loop and drops what is left
        # only the blocker computed: one batch of one image, or (step mode) two 1-row evaluations
        computed = sp.metric("cmserve_batch_size_images_sum") - rows_before
        assert computed == (1 if batching == "request" else 2)
        assert sp.metric("cmserve_rejected_total", reason="deadline") == 8
        assert sp.metric("cmserve_rejected_total", reason="disconnected") == 16
        # a header deadline works too
        r = c.post("/v1/generate", json={"seed": 5}, headers={"x-request-timeout": "0.0001"})
        assert r.status_code == 504


def test_backpressure_429_with_retry_after_while_health_stays_fast(tiny_ckpt: Path, tmp_path: Path) -> None:
    env = {"FAULT_SLOW_MS": "400"}
    args = (
        "--checkpoint",
        str(tiny_ckpt),
        "--buckets",
        "1,2,4",
        "--max-batch-size",
        "4",
        "--max-queue-images",
        "8",
    )
    with (
        serve_process(*args, tmp=tmp_path, module=FAULTS, env=env) as sp,
        httpx.Client(base_url=sp.url, timeout=60, limits=httpx.Limits(max_connections=64)) as load,
        httpx.Client(base_url=sp.url, timeout=5) as probe,
    ):
        probe.get("/healthz")  # open the probe's connection before the load starts
        with cf.ThreadPoolExecutor(40) as pool:
            futs = [pool.submit(load.post, "/v1/generate", json={"seed": i}) for i in range(40)]
            time.sleep(1.0)
            health = []
            for _ in range(20):
                t = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                health.append(time.perf_counter() - t)
                assert probe.get("/readyz").status_code == 200
            results = [f.result() for f in futs]
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 429}
        assert codes.count(429) >= 20 and codes.count(200) >= 8
        retry = [int(r.headers["retry-after"]) for r in results if r.status_code == 429]
        assert min(retry) >= 1
        # health checks never wait behind the model (a 400 ms batch runs the whole time)
        assert sorted(health)[len(health) // 2] < 0.05 and max(health) < 0.3, health
        assert sp.metric("cmserve_rejected_total", reason="queue_full") == codes.count(429)
