"""`make gpu-check`: everything that needs a GPU, in one run that fits 10 minutes.

    python3 -m bench.gpu_check --out docs/gpu [--budget 540]

Runs with the host's own Python and CUDA torch (no virtual environment); what the host lacks
comes from wheels (`make gpu-wheels`). Parts, in order of value, each in its own process group
with a time limit (a part past its limit is killed with its children, and the rest still run):

    env       device, versions, measured matmul and copy ceilings beside the datasheet's
    kernels   every Triton kernel vs a float64 reference, fp32 / bf16 / fp16 (bench/gpu_kernels.py)
    model     presets mnist-s, dit-b2, dit-xl2: eager vs graph, Triton vs torch ops, roofline
    profile   dit-b2 and mnist-s under torch.profiler: kernel time by class (matmul, attention,
              norms, ...), the kernels' summed time against the wall time (bench/gpu_profile.py)
    engine    the shipped checkpoints through the Engine: graph vs eager reference per bucket,
              served batch vs replay, capture time and memory, batch invariance, the teacher
    pytest    the `cuda`-marked tests
    server    `cmserve bench server --quick` on the GPU with the shipped model, against LitServe
              and a plain FastAPI endpoint, and with 4 front-end processes (--frontends 4)
    frontend  `cmserve bench frontend` (a stub model): requests/s with 1, 2, 4 and 8 front-end
              processes against the peers' single process
    quality   FLD and class accuracy of the served model at fp32 / bf16 / fp16 (/ fp8)
    kbench    kernels/bench.py: each kernel's time against torch
    asweep    the attention kernel's block sizes, warps and stages swept on the models' shapes
              (not run by default: its findings are the kernel's defaults; `--parts asweep`)
    qsweep    the float8 quantization kernel's rows per program and warps swept on DiT-B/2's and
              DiT-XL/2's activations, DiT-B/2 at float8 beside bf16, DiT-XL/2 at batch 64 (not
              run by default: `--parts qsweep`; Hopper only)

The report (`<out>/<device>.json` and `.md`) is rewritten after every part, so a run killed at its
limit keeps what was done. Without CUDA it says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# (name, most seconds it may take)
# In the order of what a short lease most needs (each part's time on an H100 is in its report
# under docs/gpu/): correctness and the model's speed first, then the kernel variants, the
# engine, the cuda tests and quality; the servers last, as they take longest.
PARTS: list[tuple[str, int]] = [
    ("env", 40),
    ("kernels", 80),
    ("model", 170),
    ("profile", 60),
    ("kbench", 90),
    ("engine", 110),
    ("pytest", 100),
    ("quality", 65),
    ("server", 130),
    ("frontend", 120),
    ("asweep", 120),
    ("qsweep", 120),
]
MIN_PART_S = 20
ROOT = Path(__file__).resolve().parent.parent


def run_part(name: str, out: Path, deadline: float) -> Any:
    """The body of one part, in its own process; returns what goes into the report."""
    from models import fp8

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "env":
        from bench.roofline import datasheet, measure_peaks

        name_ = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor()
        info: dict[str, Any] = {
            "device": name_,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            info.update(sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
            query = "driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
        info["datasheet"] = datasheet(name_)
        info["measured"] = {k: round(v, 3) for k, v in measure_peaks(dev).items()}
        return info
    if name == "kernels":
        from bench.gpu_kernels import check

        return check(str(dev))
    if name == "model":
        from bench.gpu_model import bench_preset
        from bench.roofline import datasheet, measure_peaks

        env = _load(out, "env") or {}
        measured = env.get("measured") or measure_peaks(dev)
        sheet = datasheet(torch.cuda.get_device_name()) if dev.type == "cuda" else None
        plans: list[tuple[str, torch.dtype, list[int], tuple[str, ...]]] = [
            ("dit-b2", torch.bfloat16, [1, 8, 32, 128, 256], ("cast", "autocast")),
            ("mnist-s", torch.bfloat16, [1, 16, 64, 256, 1024], ("cast",)),
            ("mnist-s", torch.float32, [1, 64, 1024], ("cast",)),
            ("dit-xl2", torch.bfloat16, [1, 8, 32, 64], ("cast",)),
        ]
        if dev.type == "cuda" and fp8.supported(dev):
            # --dtype float8: the blocks' linears in e4m3 (models/fp8.py), against the fp8 peak
            plans.insert(1, ("dit-b2", torch.float8_e4m3fn, [1, 32, 256], ("cast",)))
        if dev.type != "cuda":  # a harness check: the small model only
            plans = [("mnist-s", torch.float32, [1, 8], ("cast",))]
        results = []
        for preset, dt, batches, modes in plans:
            # fp32 models run without TF32: the fp32 peak
            key = "float8" if dt == torch.float8_e4m3fn else str(dt).removeprefix("torch.")
            peak = (sheet or {}).get("tflops", {}).get(key) or measured.get(key) or measured["float32"]
            results.append(bench_preset(
                preset, dt, batches, dev, peak, measured["copy_tbps"], modes=modes, deadline=deadline - 5,
            ))  # fmt: skip
            _save(out, "model", results)  # partial results survive a kill
        return results
    if name == "profile":
        from bench.gpu_profile import profile_preset

        profiles: list[tuple[str, torch.dtype, list[int]]] = [
            ("dit-b2", torch.bfloat16, [1, 256]),
            ("mnist-s", torch.bfloat16, [1, 64]),
        ]
        if dev.type == "cuda" and fp8.supported(dev):
            profiles.insert(1, ("dit-b2", torch.float8_e4m3fn, [256]))  # where float8's time goes
        if dev.type != "cuda":  # a harness check
            profiles = [("mnist-s", torch.float32, [1, 4])]
        done = []
        for preset, dt, batches in profiles:
            done.append(profile_preset(preset, dt, batches, dev, deadline=deadline - 5))
            _save(out, "profile", done)
        return done
    if name == "engine":
        from bench.gpu_engine import check as engine_check

        return engine_check(
            ["bfloat16", "float32", "float16"] if dev.type == "cuda" else ["float32"],
            deadline=deadline - 5,
            device=dev.type,
        )
    if name == "quality":
        from bench.gpu_quality import check as quality_check

        if dev.type != "cuda":
            return quality_check(["float32"], n=100, deadline=deadline - 5, device="cpu")
        dtypes = ["float32", "bfloat16", "float16"]
        if fp8.supported(dev):
            dtypes.append("float8")
        return quality_check(dtypes, deadline=deadline - 5)
    if name == "asweep":
        from kernels.bench import sweep_attention

        return sweep_attention(str(dev), deadline=deadline - 5)
    if name == "qsweep":
        from bench.gpu_model import bench_preset
        from bench.roofline import datasheet, measure_peaks
        from kernels.bench import sweep_quantize

        if dev.type != "cuda" or not fp8.supported(dev):
            raise SystemExit("qsweep needs a CUDA GPU with float8 matmuls (compute capability 9.0)")
        env = _load(out, "env") or {}
        measured = env.get("measured") or measure_peaks(dev)
        tflops = (datasheet(torch.cuda.get_device_name()) or {}).get("tflops", {})
        # the sweep leaves a minute for DiT-B/2's batches at both dtypes (and DiT-XL/2's attention
        # blocks at batch 64, if time is left)
        result: dict[str, Any] = {"sweep": sweep_quantize(str(dev), deadline=deadline - 60)}
        _save(out, "qsweep", result)
        models = []
        sweep_plans = [("dit-b2", torch.bfloat16, "bfloat16", [1, 256]),
                 ("dit-b2", torch.float8_e4m3fn, "float8", [1, 256]),
                 ("dit-xl2", torch.bfloat16, "bfloat16", [64])]  # fmt: skip
        for preset, dt, key, batches in sweep_plans:
            if time.monotonic() > deadline - 20:
                break
            peak = tflops.get(key) or measured["bfloat16"]
            models.append(bench_preset(
                preset, dt, batches, dev, peak, measured["copy_tbps"], kernel_sets=("triton",),
                deadline=deadline - 5,
            ))  # fmt: skip
            result["models"] = models
            _save(out, "qsweep", result)
        return result
    if name == "kbench":
        from kernels.bench import run

        return run(str(dev))
    raise ValueError(f"unknown part {name!r}")


def _load(out: Path, name: str) -> Any:
    p = out / f"part-{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _save(out: Path, name: str, value: Any) -> None:
    tmp = out / f".part-{name}.json"
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(out / f"part-{name}.json")


TAG = "CMSERVE_GPU_CHECK_PART"  # set in each part's environment; its descendants inherit it


def _spawn(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str]:
    """Run cmd in a new process group; on timeout kill the whole group. Then kill whatever it
    started in a session of its own and left running (the benches' servers: `bench.procs.Proc`
    starts each in a new session, out of the group's reach), found by a tag in the environment
    every descendant inherits."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    # output to a file, not a pipe: a server left running would hold a pipe open past the part
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, TAG: tag},
                             start_new_session=True)  # fmt: skip
        try:
            rc = p.wait(timeout=timeout)
            note = ""
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, note = 124, f"\n[killed after {timeout:.0f} s]"
        left = kill_tagged(tag)
        if left:
            note += f"\n[killed {len(left)} process(es) it left running: {left}]"
        log.seek(0)
        return rc, log.read().decode(errors="replace") + note


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process whose environment holds TAG=tag; returns their pids."""
    needle = f"{TAG}={tag}".encode()
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(d.name), signal.SIGKILL)
            killed.append(int(d.name))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return sorted(killed)


def part_command(name: str, work: Path, deadline: float) -> list[str]:
    py = sys.executable
    if name == "pytest":
        # only the files that hold cuda tests: collecting the rest would import test-only packages
        # (schemathesis, locust, ...) that a GPU host lacks
        files = sorted(str(p) for p in (ROOT / "tests").rglob("test_cuda*.py"))
        return [py, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "-o", "addopts=", *files]
    if name == "server":
        # rates well below the raw sampler's: on a GPU the front ends saturate at a few percent of it
        return [py, "-m", "server.cli", "bench", "server", "--quick", "--device", "cuda", "--frontends", "4",
                "--fractions", "0.01,0.03,0.1", "--clients", "4",
                "--checkpoint", str(ROOT / "models" / "weights" / "cm-mnist.json"),
                "--json", str(work / "part-server.json")]  # fmt: skip
    if name == "frontend":  # the stub model: what the front end alone sustains, by process count
        # 1 and 8 front ends and LitServe (the H100 report of 2026-11-27 has 2 and 4 as well):
        # each server costs about half a minute with its start
        return [py, "-m", "server.cli", "bench", "frontend", "--frontends", "1,8", "--duration", "3",
                "--concurrency", "256", "--clients", "4", "--peers", "litserve",
                "--json", str(work / "part-frontend.json")]  # fmt: skip
    return [py, "-m", "bench.gpu_check", "--part", name, "--work", str(work), "--deadline", str(deadline)]


def report_stem(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the report's file name."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def write_report(report: dict[str, Any], out: Path) -> Path:
    from bench.gpu_report import markdown

    stem = out / report_stem(report["device"])
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    return stem.with_suffix(".md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/gpu")
    ap.add_argument("--work", default="", help="folder for the parts' raw results (default: a temp dir)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--parts", default=",".join(n for n, _ in PARTS if n not in ("asweep", "qsweep")))
    ap.add_argument("--allow-cpu", action="store_true", help="run the harness without CUDA (tests it)")
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # a child: one part, its result to <work>/part-<name>.json
        work = Path(args.work)
        _save(work, args.part, run_part(args.part, work, args.deadline or float("inf")))
        return
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to run", file=sys.stderr)
        sys.exit(1)
    t_end = time.monotonic() + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = (
        Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    )
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "0" if cuda else "1", "PYTHONUNBUFFERED": "1"}
    report: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name() if cuda else f"cpu {platform.machine()}",
        "torch": torch.__version__,
        "command": "python3 -m bench.gpu_check " + " ".join(sys.argv[1:]),
        "parts": {},
    }
    wanted = set(args.parts.split(","))
    for name, max_s in PARTS:
        if name not in wanted:
            continue
        left = t_end - time.monotonic()
        if left < MIN_PART_S:
            report["parts"][name] = {"rc": None, "skipped": f"out of time ({left:.0f} s left)"}
            continue
        limit = min(max_s, left - 5)
        t0 = time.monotonic()
        rc, log = _spawn(part_command(name, work, time.monotonic() + limit), limit, env)
        entry: dict[str, Any] = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": log[-6000:]}
        entry["result"] = _load(work, name)
        report["parts"][name] = entry
        print(f"== {name}: rc={rc} in {entry['seconds']} s", flush=True)
        print(log[-3000:], flush=True)
        write_report(report, out)
    report["ok"] = all(p.get("rc") == 0 for p in report["parts"].values())
    print(write_report(report, out).read_text())
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
