"""`make gpu-check`: everything that needs a GPU, in one report (JSON + text).

1. the `cuda`-marked tests (native kernels vs references, graph replay == eager, no allocation
   during replay), with native Triton (TRITON_INTERPRET=0);
2. the kernel benchmarks (kernels/bench.py);
3. the raw sampler benchmark with CUDA graphs vs eager, and a short open-loop server benchmark.
Each part is recorded with its exit code and output even if an earlier one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _run(name: str, cmd: list[str], timeout: int) -> dict[str, Any]:
    t0 = time.time()
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = 124, f"timed out after {timeout} s\n{partial}"
    return {
        "name": name,
        "cmd": " ".join(cmd),
        "rc": rc,
        "seconds": round(time.time() - t0, 1),
        "output": out[-20000:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/gpu_check")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    report: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "parts": [],
    }
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device: nothing here can run"
    else:
        py = sys.executable
        report["parts"].append(
            _run(
                "cuda tests", [py, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "tests"], 900
            )
        )
        report["parts"].append(
            _run("kernel bench", [py, "-m", "kernels.bench", "--json", str(out / "kernels.json")], 900)
        )
        report["parts"].append(
            _run(
                "sampler bench",
                [
                    py,
                    "-m",
                    "server.cli",
                    "bench",
                    "sampler",
                    "--device",
                    "cuda",
                    "--backends",
                    "eager,graph",
                    "--json",
                    str(out / "sampler.json"),
                ],
                900,
            )
        )
        report["parts"].append(
            _run(
                "server bench",
                [
                    py,
                    "-m",
                    "server.cli",
                    "bench",
                    "server",
                    "--quick",
                    "--device",
                    "cuda",
                    "--json",
                    str(out / "server.json"),
                ],
                900,
            )
        )
    ok = report["cuda"] and all(p["rc"] == 0 for p in report["parts"])
    report["ok"] = ok
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"gpu-check {report['time']} on {report['device'] or 'NO GPU'} (torch {report['torch']}): "
        f"{'OK' if ok else 'FAILED'}"
    ]
    for p in report["parts"]:
        lines += [f"\n== {p['name']}: rc={p['rc']} in {p['seconds']} s\n$ {p['cmd']}", p["output"][-6000:]]
    text = "\n".join(lines)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
