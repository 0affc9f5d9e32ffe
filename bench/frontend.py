"""`cmserve bench frontend`: how many requests per second a front end sustains when the model
costs nothing — cmserve, LitServe and a plain FastAPI route, each serving a stub model that
answers at once (bench/stub_serve.py, bench/peers.py with CMSERVE_BENCH_STUB=1).

Each server gets `concurrency` clients sending back to back for `duration` s; its throughput
is reported with the CPU its whole process group used meanwhile, so requests per CPU-second is
the rate one front-end core sustains, whatever else shares the machine (the load generator
does, here). A GPU that samples tens of thousands of images per second needs a front end that
keeps up: this is the number to hold against it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.loadgen import ClientProcesses, RunResult, concurrent_loop, run
from bench.peers import STUB_ENV
from bench.procs import Proc
from bench.sampler import machine

TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> tuple[float, float]:
    """User + system CPU seconds of every live process in process group `pgid`, and of its
    leader alone (cmserve's engine process where it has front-end processes)."""
    total = leader = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            total += ticks
            leader += ticks if int(d.name) == pgid else 0
    return total / TICK, leader / TICK


# what runs only when --peers names it
PEERS = ("fastapi_routes", "default_gc", "h11", "litserve", "plain")


def cmserve_name(frontends: int) -> str:
    return "cmserve" if frontends == 1 else f"cmserve_{frontends}fe"


def specs(checkpoint: str, frontends: list[int]) -> dict[str, tuple[list[str], str]]:
    """The servers' commands: cmserve with each count of front-end processes, then the peers."""
    py = sys.executable
    flags = ["--checkpoint", checkpoint, "--device", "cpu", "--log-level", "warning"]
    flags += ["--max-queue-images", "100000"]
    out = {
        cmserve_name(k): ([py, "-m", "bench.stub_serve", *flags, "--frontends", str(k)], "/readyz")
        for k in frontends
    }
    # cmserve itself without its short path for the generate routes (server/hot_routes.py),
    # without its garbage collector settings (server/heap.py), with the pure-Python HTTP parser
    for name in ("fastapi_routes", "default_gc", "h11"):
        flag = "--" + name.replace("_", "-")
        out[name] = ([py, "-m", "bench.stub_serve", *flags, flag], "/readyz")
    out["litserve"] = ([py, "-m", "bench.peers", "litserve", "--checkpoint", checkpoint], "/health")
    out["plain"] = ([py, "-m", "bench.peers", "plain", "--checkpoint", checkpoint], "/readyz")
    return out


def _client(port: int, concurrency: int, duration: float, seed: int) -> RunResult:
    return run(concurrent_loop("127.0.0.1", port, concurrency, duration, seed=seed))


def load(port: int, concurrency: int, duration: float, clients: ClientProcesses) -> RunResult:
    """`concurrency` requests kept in flight, split over the client processes (several front
    ends need several clients)."""
    k = clients.k
    per = [concurrency // k + (i < concurrency % k) for i in range(k)]
    return clients.run(_client, [(port, per[i], duration, i) for i in range(k)])


def measure(proc: Proc, concurrency: int, duration: float, clients: ClientProcesses) -> dict[str, Any]:
    load(proc.port, concurrency, min(1.0, duration / 4), clients)  # warm
    cpu0, lead0 = group_cpu_s(proc.proc.pid)
    res = load(proc.port, concurrency, duration, clients)
    cpu1, lead1 = group_cpu_s(proc.proc.pid)
    cpu, lead = cpu1 - cpu0, lead1 - lead0
    # the load's own window: handing the shares to the client processes takes a while, with the
    # server idle
    wall = res.wall_s
    s = res.summary()
    ok = s["ok"]
    return {
        "concurrency": concurrency,
        "clients": clients.k,
        "requests_per_s": round(ok / res.wall_s, 1),
        "server_cpu_cores": round(cpu / wall, 2),
        "requests_per_cpu_s": round(ok / cpu, 1) if cpu else None,
        # the main process's share: with --frontends, the engine process's cost per request
        "main_process_cpu_cores": round(lead / wall, 2),
        "requests_per_main_cpu_s": round(ok / lead, 1) if lead else None,
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "ok": ok,
        "errors": s["errors"] + s["rejected"],
    }


def bench_frontend(args: argparse.Namespace) -> dict[str, Any]:
    from models.placeholder import build_placeholder

    tmp = Path(tempfile.mkdtemp(prefix="cmserve-frontend-"))
    ckpt = args.checkpoint or str(build_placeholder(tmp / "tiny"))
    duration = 2.0 if args.quick else args.duration
    os.environ[STUB_ENV] = "1"  # the peers' engines answer at once too
    result: dict[str, Any] = {"machine": machine(), "duration_s": duration, "servers": {}}
    frontends = [int(k) for k in args.frontends.split(",")]
    clients = ClientProcesses(args.clients)
    try:
        for name, (cmd, ready) in specs(ckpt, frontends).items():
            if name in PEERS and name not in args.peers.split(","):
                continue
            proc = Proc(cmd, ready, tmp / f"{name}.log")
            try:
                result["servers"][name] = measure(proc, args.concurrency, duration, clients)
            finally:
                proc.stop()
            print(name, result["servers"][name], flush=True)
            if args.json:  # after each server: a run killed at its time limit keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        clients.close()
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = ["| server | requests/s | server CPU cores | requests per CPU-second | main process's CPU cores "
            "| p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["servers"].items():
        cells = [name, r["requests_per_s"], r["server_cpu_cores"], r["requests_per_cpu_s"],
                 r["main_process_cpu_cores"], r["p50_ms"], r["p99_ms"], r["errors"]]  # fmt: skip
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows) + "\n"
