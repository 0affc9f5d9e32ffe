"""/healthz, /readyz and /metrics on a port and thread of their own (`--ops-port`).

Why: under overload the event loop that serves the API has hundreds of requests to parse
before it reaches a probe, so a liveness probe could time out and kill a pod that is only busy,
and the readiness probe drop it from the endpoints exactly when it is needed. A small threaded
HTTP server beside it answers from the same state without waiting in that line (it only needs
the GIL, which the event loop hands over every few milliseconds).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import ServerState, key_ok, readiness

SWITCH_INTERVAL_S = 0.00025


class OpsServer:
    def __init__(self, st: ServerState, host: str, port: int) -> None:
        self.httpd = ThreadingHTTPServer((host, port), _handler(st))
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="cmserve-ops", daemon=True)

    def start(self) -> OpsServer:
        # A thread waiting for the GIL gets it when the holder blocks or after the switch
        # interval; a request here waits that out at every socket call, and under an API flood
        # the event loop holds the GIL between its own calls. 0.25 ms instead of Python's 5 ms.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(st: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes: with Nagle's algorithm the second waits for the
        # client's delayed ACK (~40 ms per answer on a kept-alive connection)
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            protect = st.settings.protect_ops_endpoints
            if protect and not key_ok(self.headers.get("authorization", ""), st.settings.api_keys):
                return self._json(
                    401, {"error": {"message": "missing or invalid API key", "code": "invalid_api_key"}}
                )
            if path == "/healthz":
                return self._json(200, {"status": "ok"})
            if path == "/readyz":
                code, status = readiness(st)
                return self._json(code, {"status": status})
            if path == "/metrics":
                return self._send(200, generate_latest(st.metrics.registry), CONTENT_TYPE_LATEST)
            return self._json(
                404, {"error": {"message": "not found; this port serves /healthz, /readyz and /metrics"}}
            )

        def _json(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, payload: bytes, ctype: str) -> None:
            # one write for status, headers and body: every socket call here is a point where
            # this thread gives the GIL up and must win it back from a busy event loop
            reason = self.responses.get(code, ("",))[0]
            head = (
                f"HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(payload)}\r\n\r\n"
            )
            self.wfile.write(head.encode("latin-1") + payload)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log
            pass

    return Handler
