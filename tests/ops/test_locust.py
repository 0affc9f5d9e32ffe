"""A short headless Locust run against a real server passes its SLO check; an impossible SLO fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.ops.helpers import DEPLOY, run, tool
from tests.procs import serve_process

pytestmark = pytest.mark.slow


def _locust(url: str, tmp: Path, *slo: str) -> tuple[int, str]:
    p = run(
        tool("locust"),
        "-f",
        str(DEPLOY / "locust" / "locustfile.py"),
        "--headless",
        "-H",
        url,
        "-u",
        "4",
        "-r",
        "4",
        "-t",
        "6s",
        "--stop-timeout",
        "10",
        "--user-rate",
        "3",
        "--only-summary",
        "--csv",
        str(tmp / "locust"),
        *slo,
        ok=False,
        timeout=90,
    )
    return p.returncode, p.stdout + p.stderr


def test_locust_slo_verdicts(tiny_ckpt: Path, tmp_path: Path) -> None:
    with serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1,2,4,8", tmp=tmp_path) as sp:
        rc, out = _locust(sp.url, tmp_path, "--slo-p95-ms", "5000", "--slo-p99-ms", "10000")
        assert rc == 0, out
        assert '"result": "PASS"' in out
        assert (tmp_path / "locust_stats.csv").read_text().count("generate") >= 1
        rc, out = _locust(sp.url, tmp_path, "--slo-p95-ms", "0.001", "--slo-p99-ms", "0.001")
        assert rc == 1, out
        assert "FAIL: p95" in out


def _verdict(out: str) -> dict:  # type: ignore[type-arg]
    m = re.search(r"SLO verdict: (\{.*\})", out)
    assert m, out[-2000:]
    return json.loads(m.group(1))


def test_requests_in_flight_at_the_end_are_waited_for_or_counted_as_failures(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """A server slower than the arrivals: at the end requests are still in flight. With time to
    drain they all complete; without, the unfinished ones are failures, none vanishes."""
    env = {"FAULT_SLOW_MS": "150"}  # each batch takes 0.15 s more: ~7 requests/s against 12 arriving
    args = ("--checkpoint", str(tiny_ckpt), "--buckets", "1,2,4,8", "--max-batch-size", "1")
    with serve_process(*args, tmp=tmp_path, module="tests.reliability.fault_server", env=env) as sp:
        rc, out = _locust(
            sp.url, tmp_path, "--drain-timeout", "60", "--slo-p99-ms", "1e9", "--max-fail-ratio", "1"
        )
        v = _verdict(out)
        assert v["sent"] > 10 and v["unfinished"] == 0 and v["completed"] == v["sent"], v
        assert "requests in flight" in out
        rc, out = _locust(sp.url, tmp_path, "--drain-timeout", "0.5", "--slo-p99-ms", "1e9")
        v = _verdict(out)
        assert v["unfinished"] > 0 and v["completed"] + v["unfinished"] == v["sent"], v
        assert v["failures"] >= v["unfinished"] and rc == 1 and "fail ratio" in v["result"], v


def test_loadtest_script_says_what_it_waits_for_and_stops_its_server_on_term(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from bench.procs import free_port

    env = {**os.environ, "PORT": str(free_port()), "DURATION": "120s", "OUT": str(tmp_path), "USERS": "1"}
    script = DEPLOY / "locust" / "run.sh"
    proc = subprocess.Popen(
        [str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("load:"):
                break
        out = "".join(lines)
        assert "waiting for" in out and "ready after" in out, out
        server = int(re.search(r"pid (\d+)", out).group(1))  # type: ignore[union-attr]
        os.kill(server, 0)  # running
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(server, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the server {server} outlived its script")
    finally:
        if proc.poll() is None:
            proc.kill()
