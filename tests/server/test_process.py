"""A real server process: requests over TCP, then /metrics counts and sums moved as they should."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from bench.procs import sample_sum
from tests.procs import ROOT, serve_process

pytestmark = pytest.mark.slow


def _sample(text: str, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    total = sample_sum(text, name, **labels)
    assert total is not None, f"{name}{labels} not in /metrics"
    return total


def test_real_process_serves_and_metrics_move(tiny_ckpt: Path, tmp_path: Path) -> None:
    with (
        serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1,2,4,8", tmp=tmp_path) as sp,
        httpx.Client(base_url=sp.url, timeout=30) as c,
    ):
        before = c.get("/metrics").text
        assert _sample(before, "cmserve_ready") == 1.0
        n_images = 0
        for i in range(6):
            n = 1 + i % 3
            r = c.post("/v1/generate", json={"class_label": i % 10, "n": n, "seed": i, "steps": 1 + i % 2})
            assert r.status_code == 200
            n_images += n
        assert c.post("/v1/generate", json={"n": 0}).status_code == 422
        after = c.get("/metrics").text
        assert _sample(after, "cmserve_images_generated_total") == n_images
        assert _sample(after, "cmserve_requests_total", code="200", route="/v1/generate") == 6
        assert _sample(after, "cmserve_requests_total", code="422", route="/v1/generate") == 1
        assert _sample(after, "cmserve_request_duration_seconds_count", route="/v1/generate") == 7
        assert _sample(after, "cmserve_request_duration_seconds_sum", route="/v1/generate") > 0
        assert _sample(after, "cmserve_queue_wait_seconds_count") == 6
        assert _sample(after, "cmserve_batch_size_images_sum") == n_images
        assert _sample(after, "cmserve_encode_seconds_count") == 6
        model = "placeholder-untrained"  # the tiny checkpoint's card name
        assert _sample(after, "cmserve_images_generated_total", model=model) == n_images
        computed = _sample(after, "cmserve_batch_compute_seconds_count", model=model, steps="1") + _sample(
            after, "cmserve_batch_compute_seconds_count", model=model, steps="2"
        )
        assert computed == _sample(after, "cmserve_batch_size_images_count") == 6
        # buckets are dense from 1 ms: the 1 ms bucket exists, so histogram_quantile can resolve it
        bucket = 'cmserve_request_duration_seconds_bucket{le="0.001",route="/v1/generate",status_class="2xx"}'
        assert bucket in after
        # status classes apart: the 422 is not among the served requests' latencies
        assert (
            _sample(after, "cmserve_request_duration_seconds_count", route="/v1/generate", status_class="2xx")
            == 6
        )
        assert (
            _sample(after, "cmserve_request_duration_seconds_count", route="/v1/generate", status_class="4xx")
            == 1
        )
        # process metrics, the build, nothing of `_created`, and a finite bucket for the longest deadline
        assert (
            _sample(after, "process_resident_memory_bytes") > 10e6 and _sample(after, "process_open_fds") > 0
        )
        assert _sample(after, "cmserve_build_info", version=version("cmserve")) == 1
        assert "_created" not in after and 'le="120.0"' in after
        assert _sample(after, "cmserve_queue_depth_images") == 0
        assert _sample(after, "cmserve_inflight_requests") == 0


def test_serve_help_imports_no_tooling() -> None:
    """`cmserve serve --help` builds its parser without torch, the eval or the benchmarks."""
    code = (
        "import sys\n"
        "from server.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'models.evaluate', 'bench', 'matplotlib', 'litserve')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_busy_port_fails_at_once(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A port already taken is reported before loading and warm-up, not after them."""
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--checkpoint",
            str(tiny_ckpt),
            "--port",
            str(port),
        ]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in p.stderr
    assert time.monotonic() - t0 < 15


def test_version() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "server.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and p.stdout.startswith("cmserve ")


def test_json_logs_with_request_ids_an_access_log_and_one_ready_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    import json

    args = ("--checkpoint", str(tiny_ckpt), "--buckets", "1,2", "--access-log", "--log-format", "json")
    with serve_process(*args, tmp=tmp_path) as sp, httpx.Client(base_url=sp.url, timeout=30) as c:
        assert (
            c.post("/v1/generate", json={"seed": 1}, headers={"x-request-id": "req-abc"}).status_code == 200
        )
        assert c.post("/v1/generate", json={"n": 0}, headers={"x-request-id": "req-bad"}).status_code == 422
        # an access line is written once its response is sent, so it can trail the client's read
        deadline = time.monotonic() + 10
        while True:
            text = sp.output()
            text = text[: text.rfind("\n") + 1]  # whole lines only: the server may be mid-write
            lines = [json.loads(ln) for ln in text.splitlines() if ln.strip()]  # one JSON object each
            access = {ln["request_id"]: ln for ln in lines if ln["logger"] == "cmserve.access"}
            if "req-bad" in access or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert all({"time", "level", "logger", "message"} <= set(ln) for ln in lines)
    assert access["req-abc"]["status"] == 200 and access["req-abc"]["path"] == "/v1/generate"
    assert access["req-bad"]["status"] == 422 and access["req-abc"]["duration_ms"] > 0
    ready = [ln for ln in lines if ln["message"].startswith("ready:")]
    assert len(ready) == 1 and "placeholder-untrained" in ready[0]["message"]
    # uvicorn's own lines come through the same JSON handler
    assert any(ln["logger"].startswith("uvicorn") for ln in lines)
