"""`cmserve serve --frontends 2`, as processes: the front ends share the port, a crashed front end
is restarted while the other keeps answering, and front ends do not outlive their engine."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.procs import free_port, sample_sum
from tests.procs import ServerProc, serve_process

pytestmark = pytest.mark.slow


def frontend_pids(sp: ServerProc) -> dict[int, int]:
    """Front-end index -> pid of its latest start, from the engine process's log."""
    return {int(i): int(p) for i, p in re.findall(r"front end (\d+) started \(pid (\d+)\)", sp.output())}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def generate(url: str, seed: int) -> int:
    with httpx.Client(base_url=url, timeout=30) as c:  # a connection of its own
        return c.post("/v1/generate", json={"seed": seed, "class_label": seed % 10}).status_code


def test_front_ends_serve_the_port_and_a_crashed_one_comes_back(tiny_ckpt: Path, tmp_path: Path) -> None:
    ops = free_port()
    args = ("--checkpoint", str(tiny_ckpt), "--frontends", "2", "--ops-port", str(ops))
    with serve_process(*args, tmp=tmp_path) as sp:
        pids = frontend_pids(sp)
        assert sorted(pids) == [0, 1] and all(alive(p) for p in pids.values())
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda s: generate(sp.url, s), range(32))) == [200] * 32
        time.sleep(1.0)  # past a metrics push (a killed process loses what it had not pushed)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.2)
        # new connections go to the front end still listening
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda s: generate(sp.url, s), range(8))) == [200] * 8
        deadline = time.monotonic() + 30
        while frontend_pids(sp)[0] == pids[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        restarted = frontend_pids(sp)[0]
        assert restarted != pids[0] and alive(restarted), sp.output()
        # /metrics from any front end counts every process's requests (the dead one's included)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sp.metric("cmserve_request_duration_seconds_count", route="/v1/generate") >= 40:
                break
            time.sleep(0.2)
        assert sp.metric("cmserve_request_duration_seconds_count", route="/v1/generate") >= 40
        assert sp.metric("cmserve_batch_size_images_count") >= 1
        # the ops listener (in the engine process) publishes the same sums
        time.sleep(0.6)
        text = httpx.get(f"http://127.0.0.1:{ops}/metrics", timeout=10).text
        assert (sample_sum(text, "cmserve_request_duration_seconds_count", route="/v1/generate") or 0) >= 40
        assert httpx.get(f"http://127.0.0.1:{ops}/readyz", timeout=10).status_code == 200


def test_front_ends_do_not_outlive_the_engine(tiny_ckpt: Path, tmp_path: Path) -> None:
    with serve_process("--checkpoint", str(tiny_ckpt), "--frontends", "2", tmp=tmp_path) as sp:
        pids = frontend_pids(sp)
        assert generate(sp.url, 1) == 200
        sp.proc.kill()
        sp.proc.wait(10)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids.values()), sp.output()
