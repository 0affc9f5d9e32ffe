"""/healthz, /readyz and /metrics on a port and process of their own (`--ops-port`).

Why: under overload the event loop that serves the API has hundreds of requests to parse before
it reaches a probe, so a liveness probe could time out and kill a pod that is only busy, and the
readiness probe drop it from the endpoints exactly when it is needed. A thread beside the loop
still shares its GIL: under a flood of 300 connections on 2 cores its answers took up to
~0.2 s. A process of its own shares nothing but the cores, and the kernel wakes a mostly idle
process at once.

The server process publishes a snapshot every `PUBLISH_S` over a pipe: readiness, the metrics
text, the API keys (when the ops routes are protected), and when its event loop last ran. The
ops process answers from the latest snapshot: /metrics is at most `PUBLISH_S` old; /healthz is
503 when the server's event loop has not run for `STALL_S` (a hung server must fail its
liveness probe) or no snapshot came for as long. It exits when the server process goes away.

This module's top level imports the standard library only: the ops process (started with
`spawn`, a fresh interpreter) must not pay for torch.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from server.keys import key_ok

if TYPE_CHECKING:
    from server.deps import ServerState

PUBLISH_S = 0.5  # how stale /metrics and /readyz may be
STALL_S = 10.0  # an event loop that has not run for this long is hung: /healthz 503
NOT_FOUND = {"error": {"message": "not found; this port serves /healthz, /readyz and /metrics"}}


class OpsServer:
    """The server side: starts the ops process and feeds it snapshots."""

    def __init__(self, st: ServerState, host: str, port: int, stall_s: float = STALL_S) -> None:
        self.st = st
        ctx = multiprocessing.get_context("spawn")
        self._recv, self._send = ctx.Pipe(duplex=False)
        self._started = ctx.Event()
        self.proc = ctx.Process(
            target=serve_ops,
            args=(self._recv, host, port, self._started, stall_s),
            name="cmserve-ops",
            daemon=True,
        )
        self._stop = threading.Event()
        self._beat = time.monotonic()  # when the event loop last ran (time.monotonic is system-wide)
        self._thread = threading.Thread(target=self._publish_loop, name="cmserve-ops-publish", daemon=True)
        self._beat_task: asyncio.Task[None] | None = None

    def start(self) -> OpsServer:
        """Start the process and wait until it listens (a busy port fails here, at start-up)."""
        self.proc.start()
        self._recv.close()  # the child's end: its EOF then tells the child we are gone
        deadline = time.monotonic() + 60
        while not self._started.wait(0.05):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the ops listener did not start (exit code {self.proc.exitcode})")
        self._publish()
        self._thread.start()
        self._beat_task = asyncio.get_running_loop().create_task(self._heartbeat())
        return self

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(PUBLISH_S / 2)

    def _snapshot(self) -> dict[str, Any]:
        from prometheus_client import CONTENT_TYPE_LATEST

        from server.deps import readiness

        st = self.st
        code, status = readiness(st)
        protect = st.settings.protect_ops_endpoints
        return {
            "ready": [code, status],
            "metrics": st.metrics_body(),
            "metrics_type": CONTENT_TYPE_LATEST,
            "keys": list(st.settings.api_keys) if protect else None,
            "beat": self._beat,
            "at": time.monotonic(),
        }

    def _publish(self) -> None:
        try:
            self._send.send(self._snapshot())
        except (BrokenPipeError, OSError):
            self._stop.set()  # the ops process is gone; nothing to feed

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            self._publish()

    def stop(self) -> None:
        self._stop.set()
        if self._beat_task is not None:
            self._beat_task.cancel()
        self._send.close()  # EOF: the ops process exits
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def serve_ops(conn: Connection, host: str, port: int, started: Any, stall_s: float) -> None:
    """The ops process: listen, answer from the latest snapshot, exit on the pipe's EOF."""
    snap: dict[str, Any] = {}
    httpd = ThreadingHTTPServer((host, port), _handler(lambda: snap, stall_s))
    httpd.daemon_threads = True

    def receive() -> None:
        nonlocal snap
        try:
            while True:
                snap = conn.recv()
        except (EOFError, OSError):  # the server process is gone or stopping
            os._exit(0)

    threading.Thread(target=receive, name="ops-receive", daemon=True).start()
    started.set()
    httpd.serve_forever()


def _handler(latest: Any, stall_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes: with Nagle's algorithm the second waits for the
        # client's delayed ACK (~40 ms per answer on a kept-alive connection)
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            snap, path = latest(), self.path.split("?", 1)[0]
            if not snap:  # none yet: the server publishes one before it starts serving
                return self._json(503, {"status": "starting"})
            keys = snap["keys"]
            if keys is not None and not key_ok(self.headers.get("authorization", ""), keys):
                return self._json(
                    401, {"error": {"message": "missing or invalid API key", "code": "invalid_api_key"}}
                )
            if path == "/healthz":
                now = time.monotonic()
                stalled = now - snap["beat"] > stall_s or now - snap["at"] > stall_s
                return (
                    self._json(503, {"status": "stalled"}) if stalled else self._json(200, {"status": "ok"})
                )
            if path == "/readyz":
                code, status = snap["ready"]
                return self._json(code, {"status": status})
            if path == "/metrics":
                return self._send(200, snap["metrics"], snap["metrics_type"])
            return self._json(404, NOT_FOUND)

        def _json(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, payload: bytes, ctype: str) -> None:
            reason = self.responses.get(code, ("",))[0]
            head = (
                f"HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(payload)}\r\n\r\n"
            )
            self.wfile.write(head.encode("latin-1") + payload)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log
            pass

    return Handler
