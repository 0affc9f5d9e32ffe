"""Overload at 4x saturation for 30 s (and a 10-minute soak at 70%, `make soak`): no 5xx, every
request answered exactly once, accepted requests' p99 bounded by the queue, RSS back to normal.

The model is the shipped architecture (mnist-s) with random weights: the cost per image is the
real one without depending on the trained checkpoint."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.loadgen import concurrent_loop, make_body, open_loop
from tests.procs import free_port, serve_process

pytestmark = pytest.mark.slow
QUEUE, BATCH = 128, 32


@pytest.fixture(scope="module")
def real_size_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.placeholder import build_placeholder

    return build_placeholder(tmp_path_factory.mktemp("ckpt") / "mnist-s", arch="mnist-s")


def _saturation(port: int) -> float:
    """Images/s the server sustains when flooded (measured, not assumed)."""
    res = asyncio.run(
        open_loop("127.0.0.1", port, rate=400, duration_s=4.0, body_fn=lambda r: (make_body(r, n=4), 4))
    )
    return res.images_ok / res.wall_s


# /healthz and /metrics on the ops port, and for comparison /healthz on the API's own port
PROBER = """
import json, sys, time, httpx
ops, main, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
lat, main_lat, fails, end = [], [], 0, time.monotonic() + duration
with httpx.Client(timeout=3) as c:
    while time.monotonic() < end:
        for url, path, out in ((ops, "/healthz", lat), (ops, "/metrics", lat), (main, "/healthz", main_lat)):
            t = time.perf_counter()
            try:
                ok = c.get(url + path).status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append(time.perf_counter() - t)
            fails += not ok and out is lat
        time.sleep(0.05)
print(json.dumps({"latencies": lat, "main_latencies": main_lat, "fails": fails}))
"""


def _run(real_size_ckpt: Path, tmp_path: Path, factor: float, duration: float) -> None:
    args = (
        "--checkpoint",
        str(real_size_ckpt),
        "--buckets",
        "1,2,4,8,16,32",
        "--max-batch-size",
        str(BATCH),
        "--max-queue-images",
        str(QUEUE),
        "--default-timeout-s",
        "60",
    )
    with serve_process(*args, tmp=tmp_path) as sp:
        port = int(sp.url.rsplit(":", 1)[1])
        sat = _saturation(port)  # also warms every code path before the RSS baseline
        time.sleep(1)
        rss0 = sp.rss_bytes()
        rate = factor * sat / 4  # requests/s of n = 4 images
        sent0 = sp.metric("cmserve_requests_total", route="/v1/generate", default=0.0)
        res = asyncio.run(
            open_loop(
                "127.0.0.1",
                port,
                rate,
                duration,
                seed=1,
                body_fn=lambda r: (make_body(r, n=4, steps=random.Random(r.random()).choice([1, 2])), 4),
            )
        )
        time.sleep(2)
        rss1 = sp.rss_bytes()
        answered = sp.metric("cmserve_requests_total", route="/v1/generate") - sent0
        compute_mean = sp.metric("cmserve_batch_compute_seconds_sum") / sp.metric(
            "cmserve_batch_compute_seconds_count"
        )
    s = res.summary()
    print(
        f"\nload x{factor}: saturation {sat:.0f} img/s, sent {res.sent}, statuses {s['statuses']}, "
        f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB"
    )
    assert res.sent > 0 and sum(res.statuses.values()) == res.sent  # every request got an answer...
    assert answered == res.sent  # ...and the server answered each exactly once
    assert set(res.statuses) <= {200, 429, 503, 504}, s["statuses"]  # no 5xx but the specified ones
    assert 500 not in res.statuses and 0 not in res.statuses
    # bound: an accepted request waits behind at most QUEUE images, i.e. QUEUE/BATCH + 1 batches,
    # then its own batch; x2 for scheduling noise on 2 shared cores
    bound_s = (QUEUE / BATCH + 2) * max(compute_mean, BATCH / sat)
    assert s["p99_ms"] is not None and s["p99_ms"] / 1e3 <= 2 * bound_s, (s["p99_ms"], bound_s)
    assert rss1 <= 1.10 * rss0, (rss0, rss1)
    if factor > 1:
        assert res.statuses.get(429, 0) > 0  # overload is shed, not queued without bound


def test_overload_4x_saturation(real_size_ckpt: Path, tmp_path: Path) -> None:
    _run(real_size_ckpt, tmp_path, factor=4.0, duration=30.0)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))]


def test_ops_port_answers_under_a_connection_flood(real_size_ckpt: Path, tmp_path: Path) -> None:
    """300 connections sending n = 8 back to back for 30 s (far past saturation): /healthz and
    /metrics on the ops port (a process of its own) keep answering fast while the same /healthz
    on the API's port waits behind the flood; every API request gets one answer."""
    ops_port, duration = free_port(), 30.0
    args = ("--checkpoint", str(real_size_ckpt), "--buckets", "1,2,4,8,16,32", "--max-batch-size", str(BATCH),
            "--max-queue-images", str(QUEUE), "--ops-port", str(ops_port))  # fmt: skip
    with serve_process(*args, tmp=tmp_path) as sp:
        port = int(sp.url.rsplit(":", 1)[1])
        sent0 = sp.metric("cmserve_requests_total", route="/v1/generate", default=0.0)
        # the prober is a process of its own, so the load generator's event loop cannot delay it
        prober = subprocess.Popen(
            [sys.executable, "-c", PROBER, f"http://127.0.0.1:{ops_port}", sp.url, str(duration)],
            stdout=subprocess.PIPE,
            text=True,
        )
        res = asyncio.run(concurrent_loop("127.0.0.1", port, 300, duration, seed=2, n=8))
        probes = json.loads(prober.communicate(timeout=duration + 60)[0])
        answered = sp.metric("cmserve_requests_total", route="/v1/generate") - sent0
    ops, api = probes["latencies"], probes["main_latencies"]

    def ms(xs: list[float]) -> str:
        q = [_quantile(xs, 0.5), _quantile(xs, 0.99), max(xs)]
        return "p50 {:.1f} p99 {:.1f} max {:.1f} ms".format(*(x * 1e3 for x in q))

    statuses = res.summary()["statuses"]
    print(
        f"\nflood: {res.sent} requests {statuses}; ops port ({len(ops)} probes) {ms(ops)}; API port {ms(api)}"
    )
    assert probes["fails"] == 0 and len(ops) >= 2 * duration
    # the ops process shares only the cores with the flooded server, not its GIL
    assert _quantile(ops, 0.99) <= 0.100 and max(ops) <= 0.250, (_quantile(ops, 0.99), max(ops))
    assert _quantile(ops, 0.99) < _quantile(api, 0.99) / 2
    assert sum(res.statuses.values()) == res.sent and answered == res.sent  # nothing lost
    assert set(res.statuses) <= {200, 429}, res.statuses


@pytest.mark.timeout(900)  # the suite's 300 s per-test limit would cut the 10-minute run short
def test_soak_70pct_10_minutes(real_size_ckpt: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--run-soak"):
        pytest.skip("10-minute soak: run with `make soak`")
    _run(real_size_ckpt, tmp_path, factor=0.7, duration=600.0)
