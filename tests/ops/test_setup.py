"""Set-up beyond this machine: `make test` without root skips what it cannot install (saying
why) instead of failing, and `make serve` asks for torch's CPU build wherever it runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.ops import helpers
from tests.procs import ROOT


def test_install_tools_without_root_says_why_and_lets_the_tests_skip(tmp_path: Path) -> None:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in (("id", "echo 1000"), ("sudo", "exit 1"), ("apt-get", "exit 99")):
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": str(bin_)}  # no prometheus, promtool or chromium on it
    p = subprocess.run(
        ["/bin/bash", str(ROOT / "deploy" / "install-tools.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert "needs root" in p.stdout and "skipped" in p.stdout


def test_a_missing_system_tool_skips_and_a_missing_venv_tool_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(helpers, "BIN", Path("/nonexistent"))
    with pytest.raises(pytest.skip.Exception, match="installs it as root"):
        helpers.tool("promtool")
    with pytest.raises(AssertionError, match="run `make test`"):
        helpers.tool("locust")


def test_make_serve_asks_for_the_cpu_build_of_torch() -> None:
    p = subprocess.run(
        ["make", "-n", "-B", "/nonexistent-venv/.serve", "VENV=/nonexistent-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "torch==2.13.0+cpu" in p.stdout and "--index-url https://download.pytorch.org/whl/cpu" in p.stdout
