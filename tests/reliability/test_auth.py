"""API keys, protected ops endpoints, body and n limits, CORS — against a real server process."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.procs import serve_process

pytestmark = pytest.mark.slow
KEY_ENV, KEY_FILE = "env-key-0123456789", "file-key-abcdef"


def test_api_keys_limits_and_cors(tiny_ckpt: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# comment\n{KEY_FILE}\n")
    env = {"CMSERVE_API_KEYS": KEY_ENV, "CMSERVE_API_KEYS_FILE": str(keys)}
    args = (
        "--checkpoint",
        str(tiny_ckpt),
        "--buckets",
        "1,2,4",
        "--max-images-per-request",
        "4",
        "--max-body-bytes",
        "1024",
    )
    with serve_process(*args, tmp=tmp_path, env=env) as sp, httpx.Client(base_url=sp.url, timeout=30) as c:
        body = {"seed": 1}
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": KEY_ENV},
            {"authorization": f"Basic {KEY_ENV}"},
        ):
            r = c.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY_ENV not in r.text and KEY_FILE not in r.text and "wrong" not in r.text
        assert c.get("/v1/models").status_code == 401
        for key in (KEY_ENV, KEY_FILE):
            assert (
                c.post("/v1/generate", json=body, headers={"authorization": f"Bearer {key}"}).status_code
                == 200
            )
        ok = {"authorization": f"Bearer {KEY_ENV}"}
        # ops endpoints stay open unless protect_ops_endpoints is set
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        # limits
        assert c.post("/v1/generate", json={"n": 5}, headers=ok).status_code == 422
        r = c.post(
            "/v1/generate",
            content=b'{"seed": 1, "x": "' + b"a" * 2000 + b'"}',
            headers={**ok, "content-type": "application/json"},
        )
        assert r.status_code == 413
        # no CORS unless configured
        pre = c.options(
            "/v1/generate",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in pre.headers
        assert sp.metric("cmserve_requests_total", code="401") == 5


def test_protected_ops_endpoints_and_configured_cors(tiny_ckpt: Path, tmp_path: Path) -> None:
    env = {
        "CMSERVE_API_KEYS": KEY_ENV,
        "CMSERVE_PROTECT_OPS_ENDPOINTS": "true",
        "CMSERVE_CORS_ORIGINS": "https://app.example",
    }
    with (
        serve_process(
            "--checkpoint", str(tiny_ckpt), "--buckets", "1,2", tmp=tmp_path, env=env, wait_ready=False
        ) as sp,
        httpx.Client(base_url=sp.url, timeout=30) as c,
    ):
        import time

        ok = {"authorization": f"Bearer {KEY_ENV}"}
        for _ in range(300):
            try:
                if c.get("/readyz", headers=ok).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=ok).status_code == 200, path
        pre = c.options(
            "/v1/generate", headers={"origin": "https://app.example", "access-control-request-method": "POST"}
        )
        assert pre.headers.get("access-control-allow-origin") == "https://app.example"
        got = c.post("/v1/generate", json={"seed": 3}, headers={**ok, "origin": "https://app.example"})
        exposed = {h.strip() for h in got.headers.get("access-control-expose-headers", "").split(",")}
        assert {"x-request-id", "x-seed", "server-timing", "retry-after"} <= exposed, exposed
        pre = c.options(
            "/v1/generate",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in pre.headers


def test_keys_rotate_on_sighup_and_never_come_from_a_flag(tiny_ckpt: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.procs import ROOT

    p = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert "--api-keys-file" in p.stdout and "--api-keys " not in p.stdout  # keys stay out of `ps`
    keys = tmp_path / "keys.txt"
    keys.write_text("old-key-1\n")
    env = {"CMSERVE_API_KEYS": KEY_ENV, "CMSERVE_API_KEYS_FILE": str(keys)}
    with serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1", tmp=tmp_path, env=env) as sp:

        def status(key: str) -> int:
            return httpx.get(sp.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

        assert (status("old-key-1"), status("new-key-2"), status(KEY_ENV)) == (200, 401, 200)
        keys.write_text("new-key-2\n")
        sp.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status("new-key-2") != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (status("old-key-1"), status("new-key-2"), status(KEY_ENV)) == (401, 200, 200)
        keys.unlink()  # an unreadable file keeps the keys as they are
        sp.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert status("new-key-2") == 200 and sp.proc.poll() is None
        assert "cannot read the API keys file" in sp.output()
