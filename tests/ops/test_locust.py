"""A short headless Locust run against a real server passes its SLO check; an impossible SLO fails."""

from __future__ import annotations

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
