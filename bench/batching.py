"""`cmserve bench batching`: request-level against step-level batching on mixed workloads.

Two servers (`--batching request` and `--batching step`) serve the consistency model and its
32-step teacher. Per workload — all 2-step, mixed 1/2/4-step, 2-step with 10 % 32-step teacher
requests — the request-level server's saturation is measured first (64 requests kept in flight);
then open-loop Poisson load at fractions of it, request mode and step mode at each rate in turn
(the other server stopped, so it takes no CPU): p50 / p99 per request class and throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import concurrent_loop, open_loop, run
from bench.procs import Proc

WORKLOADS: dict[str, list[tuple[float, str, int]]] = {
    # (share, model, steps)
    "2-step": [(1.0, "cm", 2)],
    "mixed 1/2/4": [(1 / 3, "cm", 1), (1 / 3, "cm", 2), (1 / 3, "cm", 4)],
    "2-step + 10% 32-step": [(0.9, "cm", 2), (0.1, "teacher", 32)],
}


def body_fn(workload: str) -> Any:
    mix = WORKLOADS[workload]

    def make(rng: random.Random) -> tuple[bytes, int, str]:
        share, model, steps = rng.choices(mix, weights=[m[0] for m in mix])[0]
        body = {
            "model": model,
            "steps": steps,
            "class_label": rng.randrange(10),
            "seed": rng.randrange(2**31),
        }
        return json.dumps(body).encode(), 1, f"{steps}-step"

    return make


def _quantile(lat: list[float], q: float) -> float | None:
    lat = sorted(lat)
    return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 1) if lat else None


def saturation(proc: Proc, workload: str, seconds: float) -> float:
    """Requests/s answered with 64 kept in flight: the most the server sustains."""
    res = run(concurrent_loop("127.0.0.1", proc.port, 64, seconds, seed=7, body_fn=body_fn(workload)))
    return len(res.latencies_ok) / res.wall_s


def measure(proc: Proc, workload: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    res = run(open_loop("127.0.0.1", proc.port, rate, seconds, seed=seed, body_fn=body_fn(workload)))
    s = res.summary()
    row: dict[str, Any] = {
        "rate_rps": round(rate, 2),
        "sent": s["sent"],
        "ok": s["ok"],
        "errors": s["errors"] + s["rejected"],
        "throughput_rps": round(s["ok"] / res.wall_s, 2),
    }
    for cls, lat in sorted(res.by_class.items()):
        row[cls] = {"p50_ms": _quantile(lat, 0.5), "p99_ms": _quantile(lat, 0.99), "n": len(lat)}
    return row


def bench_batching(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-batching-"))
    ckpt, teacher = args.checkpoint, args.teacher
    if args.quick and not ckpt:
        from models.placeholder import build_placeholder

        ckpt = str(build_placeholder(tmp / "tiny"))
    models = [
        "--model",
        f"cm={ckpt}" if ckpt else "cm=models/weights/cm-mnist.json",
        "--model",
        f"teacher={teacher}",
    ]
    base = [sys.executable, "-m", "server.cli", "serve", *models, "--device", args.device,
            "--log-level", "warning", "--max-queue-images", "100000", "--max-timeout-s", "600",
            "--default-timeout-s", "600"]  # fmt: skip
    if args.max_batch_size:
        base += ["--max-batch-size", str(args.max_batch_size)]
    if args.quick:  # small buckets: the teacher's 32-step warm-up and batch timing stay short
        base += ["--buckets", "1,2,4,8", *([] if args.max_batch_size else ["--max-batch-size", "8"])]
    loads = [float(x) for x in args.loads.split(",")]
    procs = {
        mode: Proc([*base, "--batching", mode], "/readyz", tmp / f"{mode}.log")
        for mode in ("request", "step")
    }
    result: dict[str, Any] = {"loads": loads, "duration_s": args.duration, "workloads": {}}
    try:
        for workload in WORKLOADS if not args.quick else ["2-step + 10% 32-step"]:
            procs["step"].pause()
            procs["request"].resume()
            sat = saturation(procs["request"], workload, args.duration)
            if sat <= 0:
                raise RuntimeError(f"{workload}: the request-mode server answered nothing")
            rows = []
            for frac in loads:
                for mode in ("request", "step"):
                    for m, proc in procs.items():
                        (proc.resume if m == mode else proc.pause)()
                    time.sleep(0.2)
                    seed = int(frac * 100)  # both modes get the same arrivals and bodies
                    row = {"mode": mode, "load": frac,
                           **measure(procs[mode], workload, frac * sat, args.duration, seed)}  # fmt: skip
                    rows.append(row)
                    print(json.dumps({"workload": workload, **row}), flush=True)
            result["workloads"][workload] = {"saturation_rps": round(sat, 2), "rows": rows}
    finally:
        for p in procs.values():
            p.stop()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for workload, w in result["workloads"].items():
        classes = sorted(
            {k for r in w["rows"] for k in r if k.endswith("-step")}, key=lambda c: int(c.split("-")[0])
        )
        head = " | ".join(f"{c} p50 / p99 ms" for c in classes)
        lines += [
            f"\n**{workload}** (request mode saturates at {w['saturation_rps']} req/s)\n",
            f"| load | mode | req/s | {head} | errors |",
            "|---|---|---|" + "---|" * len(classes) + "---|",
        ]
        for r in w["rows"]:
            cells = " | ".join(f"{r[c]['p50_ms']} / {r[c]['p99_ms']}" if c in r else "—" for c in classes)
            load = f"{round(r['load'] * 100)} %"
            lines.append(f"| {load} | {r['mode']} | {r['throughput_rps']} | {cells} | {r['errors']} |")
    return "\n".join(lines)
