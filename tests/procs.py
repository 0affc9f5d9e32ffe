"""Start a real `cmserve serve` process on 127.0.0.1 and always stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.procs import free_port, sample_sum

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProc:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`; `default` if none exists."""
        total = sample_sum(httpx.get(self.url + "/metrics", timeout=10).text, name, **labels)
        if total is None and default is not None:
            return default
        assert total is not None, f"{name}{labels} not exported"
        return total


@contextmanager
def serve_process(
    *args: str,
    tmp: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120,
    wait_ready: bool = True,
    module: str = "server.cli",
) -> Iterator[ServerProc]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        module,
        *(["serve"] if module == "server.cli" else []),
        "--port",
        str(port),
        *args,
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
    sp = ServerProc(f"http://127.0.0.1:{port}", proc, log)
    try:
        if wait_ready:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{sp.output()}")
                try:
                    if httpx.get(sp.url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready in {ready_timeout} s:\n{sp.output()}")
                time.sleep(0.1)
        yield sp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
