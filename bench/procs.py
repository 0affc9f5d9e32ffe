"""Server processes for benchmarks and tests: a free port, a process group that always stops,
and reading a Prometheus scrape with prometheus_client's own parser."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (a histogram's `_bucket`, `_sum` and
    `_count` samples go by those full names) whose labels include `labels`."""
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append((dict(s.labels), float(s.value)))
    return out


def sample_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the matching samples' values; None when there is none."""
    found = samples(text, name, **labels)
    return sum(v for _, v in found) if found else None


def histogram_buckets(text: str, name: str, **labels: str) -> dict[float, float]:
    """{upper bound: cumulative count} of histogram `name` (without `_bucket`), summed over the
    series whose labels include `labels` (e.g. every status class of a route)."""
    out: dict[float, float] = {}
    for lab, v in samples(text, f"{name}_bucket", **labels):
        out[float(lab["le"])] = out.get(float(lab["le"]), 0.0) + v
    return out


class Proc:
    """`cmd --port P` in its own process group (LitServe forks workers, and stop() must take them
    all down), waited for until `ready_path` answers 200. Until stopped it is in LIVE, which the
    interpreter's exit stops: a bench ended by SIGTERM (SystemExit) or an error while servers
    were still starting takes them down too."""

    def __init__(self, cmd: list[str], ready_path: str, log: Path, ready_timeout: float = 180) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)],
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        LIVE.add(self)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{cmd[:4]} not ready")
            time.sleep(0.2)

    def metrics(self) -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the pid is its process group id (start_new_session)

    def stop(self) -> None:
        LIVE.discard(self)
        pgid = self.proc.pid  # == its process group id (start_new_session)
        self.resume()  # a stopped process would only act on SIGTERM once continued
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # stragglers of the group
            return


LIVE: set[Proc] = set()  # started and not yet stopped


@atexit.register
def stop_live() -> None:
    for proc in list(LIVE):
        proc.stop()
