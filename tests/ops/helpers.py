from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


SYSTEM_TOOLS = {"prometheus", "promtool"}  # from the distribution (deploy/install-tools.sh, as root)


def tool(name: str) -> str:
    """A tool from the venv or PATH. A missing system tool skips the test, saying why (installing
    it needs root, which CI has); a missing venv tool fails it (make test installs those)."""
    for cand in (BIN / name, shutil.which(name)):
        if cand and Path(cand).exists():
            return str(cand)
    if name in SYSTEM_TOOLS:
        pytest.skip(f"{name} is not installed here: deploy/install-tools.sh installs it as root (CI does)")
    raise AssertionError(f"{name} is not installed: run `make test`")


def run(*cmd: str, cwd: Path = ROOT, ok: bool = True, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def dashboard_exprs(rate_interval: str = "5s") -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "cmserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return [re.sub(r"\$__rate_interval|\$__interval", rate_interval, e) for e in exprs]
