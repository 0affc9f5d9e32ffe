"""`cmserve bench threads`: what a CPU batch costs when it shares its process — the measurements
behind "every torch call on the engine's one compute thread" (server/engine.py).

Each case runs in a fresh process (OpenMP thread teams are per-process state that sticks):
  one_thread        the engine's compute thread alone (what the server does)
  second_thread     after one batch ran on another thread too (two OpenMP teams)
  gil_load          while the main thread runs Python 1 ms in every 10 ms (an event loop's share)
  other_proc_load   while another process runs the same Python load (CPU sharing without the GIL)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time
from typing import Any

CASES = ("one_thread", "second_thread", "gil_load", "other_proc_load")


def _python_load(stop: Any, busy_s: float = 0.001, period_s: float = 0.01) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            pass
        time.sleep(period_s - busy_s)


def run_case(case: str, checkpoint: str, batches: list[int], repeats: int) -> dict[str, Any]:
    from bench.sampler import time_batch
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    e = Engine(Settings(checkpoint=checkpoint, buckets=batches), Metrics())
    e.warmup()
    if case == "second_thread":
        e.run_batch(2, [0], [0])  # this (main) thread now has an OpenMP team of its own
    ctx = mp.get_context("spawn")
    stop: Any = ctx.Event() if case == "other_proc_load" else threading.Event()
    loader: Any = None
    if case == "gil_load":
        loader = threading.Thread(target=_python_load, args=(stop,), daemon=True)
    elif case == "other_proc_load":
        loader = ctx.Process(target=_python_load, args=(stop,), daemon=True)
    if loader is not None:
        loader.start()
    try:
        ms = {b: round(e.call(time_batch, e, 2, b, repeats) * 1e3, 2) for b in batches}
    finally:
        stop.set()
        if loader is not None:
            loader.join()
        e.close()
    return {"case": case, "ms_per_batch": ms}


def run(checkpoint: str, batches: list[int], repeats: int, rounds: int) -> list[dict[str, Any]]:
    """Every case `rounds` times, interleaved; per case and batch the best round."""
    best: dict[str, dict[int, float]] = {c: {} for c in CASES}
    for _ in range(rounds):
        for case in CASES:
            cmd = [sys.executable, "-m", "bench.threads", "--case", case, "--checkpoint", checkpoint]
            cmd += ["--batches", ",".join(map(str, batches)), "--repeats", str(repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            for b, v in row["ms_per_batch"].items():
                best[case][int(b)] = min(best[case].get(int(b), float("inf")), v)
    rows = [{"case": c, "ms_per_batch": best[c]} for c in CASES]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=CASES, required=True)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    print(json.dumps(run_case(a.case, a.checkpoint, [int(b) for b in a.batches.split(",")], a.repeats)))


if __name__ == "__main__":
    main()
