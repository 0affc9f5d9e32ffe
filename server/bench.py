"""`cmserve bench sampler|server|kernels`: measure the server against its limit and its peers.

sampler  the raw sampler, no HTTP: ms per batch and images/s per (backend, bucket, steps);
server   real server processes under open-loop Poisson load, swept past saturation: cmserve with
         batching on and off, LitServe and a plain FastAPI endpoint on the same checkpoint, and the
         32-step teacher; throughput, client p50/p95/p99, the server's own histogram quantiles,
         errors and rejections per rate; a latency-vs-throughput plot.
threads  a CPU batch on the engine's one thread vs sharing the process (server/bench_threads.py).
kernels  the Triton kernels against torch (GPU only; see kernels/bench.py).
Results print as JSON lines; --json writes the whole result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx

from server.loadgen import closed_loop, make_body, open_loop, run

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = ROOT / "models" / "weights" / "teacher-mnist.json"


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sampler", help="raw sampler throughput (no HTTP)")
    s.add_argument("--checkpoint", default="")
    s.add_argument("--device", default="auto")
    s.add_argument(
        "--backends", default="", help="comma list of eager,graph; default eager on CPU, both on CUDA"
    )
    s.add_argument("--buckets", default="1,2,4,8,16,32,64")
    s.add_argument("--steps", default="1,2,4")
    s.add_argument("--repeats", type=int, default=5, help="timed batches per figure (median)")
    s.add_argument("--rounds", type=int, default=3, help="rounds over all figures; the best round counts")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--json", default="")
    v = sub.add_parser("server", help="open-loop load sweep against real servers")
    v.add_argument("--checkpoint", default="")
    v.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    v.add_argument("--device", default="auto")
    v.add_argument(
        "--fractions",
        default="0.05,0.1,0.2,0.35,0.5,0.7,1.0,1.3",
        help="arrival rates as fractions of the raw sampler's images/s",
    )
    v.add_argument("--duration", type=float, default=5.0, help="seconds per arrival rate")
    v.add_argument(
        "--min-requests", type=int, default=200, help="run a rate longer if it would send fewer requests"
    )
    v.add_argument("--peers", default="litserve,plain")
    v.add_argument("--litserve-max-batch", type=int, default=32)
    v.add_argument("--litserve-timeout", type=float, default=0.005)
    v.add_argument(
        "--quick", action="store_true", help="tiny model, 2 rates, short runs: keeps the harness working"
    )
    v.add_argument("--json", default="")
    v.add_argument("--plot", default="")
    t = sub.add_parser("threads", help="CPU batch time on one thread vs sharing the process")
    t.add_argument("--checkpoint", default="")
    t.add_argument("--batches", default="1,8,64")
    t.add_argument("--repeats", type=int, default=9)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--json", default="")
    k = sub.add_parser("kernels", help="Triton kernels vs torch (CUDA only)")
    k.add_argument("--quick", action="store_true")
    k.add_argument("--json", default="")


def machine() -> dict[str, Any]:
    import os

    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- sampler ---------------------------------------------------------------------------------
def _time_batch(e: Any, steps: int, b: int, repeats: int) -> float:
    """Median seconds of Engine.run_batch (noise, copy in, sample, copy out, uint8). Called on the
    engine's compute thread, as in the server."""
    import torch

    labels: list[int | None] = [i % 10 for i in range(b)]
    seeds = list(range(b))
    e.run_batch(steps, labels, seeds)  # warm
    times = []
    for _ in range(repeats):
        if e.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        e.run_batch(steps, labels, seeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _best_of_rounds(
    e: Any, keys: list[tuple[int, int]], repeats: int, rounds: int
) -> dict[tuple[int, int], float]:
    """(steps, bucket) -> seconds: the median of `repeats` timed batches, best over `rounds` rounds
    that each visit every key once (a burst of noise from other processes on a shared machine then
    spoils one round, not the figure)."""
    best = {k: float("inf") for k in keys}
    for _ in range(rounds):
        for key in keys:
            best[key] = min(best[key], e.call(_time_batch, e, key[0], key[1], repeats))
    return best


def _raw_engine(checkpoint: str, device: str, backend: str, buckets: list[int], steps: list[int]) -> Any:
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    e = Engine(Settings(checkpoint=checkpoint, device=device, backend=backend, buckets=buckets), Metrics())
    e.call(e.runner.warmup, steps)
    return e


def bench_sampler(
    checkpoint: str,
    device: str,
    backends: list[str],
    buckets: list[int],
    steps_list: list[int],
    repeats: int,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Per (backend, steps, bucket): ms per batch and images/s (`_best_of_rounds`)."""
    rows = []
    for backend in backends:
        e = _raw_engine(checkpoint, device, backend, buckets, steps_list)
        best = _best_of_rounds(e, [(s, b) for s in steps_list for b in buckets], repeats, rounds)
        for (steps, b), sec in best.items():
            ms = sec * 1e3
            rows.append(
                {
                    "backend": backend,
                    "model": e.card.name,
                    "steps": steps,
                    "batch": b,
                    "ms_per_batch": round(ms, 3),
                    "images_per_s": round(b / ms * 1e3, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        e.close()
    return rows


class RawClock:
    """The raw sampler (2 steps), kept loaded for a whole `bench server` run and timed again right
    before and after each cmserve figure it is compared with. Why: this VM's speed drifts by tens
    of % within minutes (raw batch 64 at 182 and 145 images/s 12 minutes apart, one day), so a
    ratio against a figure timed at the start of a 20-minute run measures the drift as well."""

    def __init__(self, checkpoint: str, device: str, repeats: int, rounds: int) -> None:
        self.e = _raw_engine(checkpoint, device, "auto", [1, 64], [2])
        self.repeats, self.rounds = repeats, rounds
        self.t0 = time.monotonic()
        self.checks: list[dict[str, Any]] = []

    def ms(self, batch: int, label: str) -> float:
        sec = _best_of_rounds(self.e, [(2, batch)], self.repeats, self.rounds)[(2, batch)]
        row = {"at_s": round(time.monotonic() - self.t0, 1), "when": label, "batch": batch}
        row.update({"ms_per_batch": round(sec * 1e3, 3), "images_per_s": round(batch / sec, 1)})
        self.checks.append(row)
        print(json.dumps(row), flush=True)
        return sec * 1e3

    def close(self) -> None:
        self.e.close()


# ---- server ----------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, cmd: list[str], ready_path: str, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        # own process group: LitServe forks workers, and stop() must take them all down
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)],
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{cmd[:4]} not ready")
            time.sleep(0.2)

    def metrics(self) -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the pid is its process group id (start_new_session)

    def stop(self) -> None:
        pgid = self.proc.pid  # == its process group id (start_new_session)
        self.resume()  # a stopped process would only act on SIGTERM once continued
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # stragglers of the group
            return


def _gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _buckets(text: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(
        r'^cmserve_request_duration_seconds_bucket\{le="([^"]+)",route="/v1/generate"\} (\S+)$', text, re.M
    ):
        out[float(m.group(1))] = float(m.group(2))
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over the bucket increase between two scrapes (seconds)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return None


def sweep(
    proc: Proc,
    rates: list[float],
    duration: float,
    server_hist: bool,
    steps: int = 2,
    min_requests: int = 0,
) -> list[dict[str, Any]]:
    """Each rate runs for `duration` s, longer where that would send fewer than `min_requests`
    (at 9 req/s, 5 s is 45 requests: their p99 would be their maximum)."""
    rows = []
    for rate in rates:
        before = _buckets(proc.metrics()) if server_hist else {}
        res = run(
            open_loop(
                "127.0.0.1",
                proc.port,
                rate,
                max(duration, min_requests / rate),
                body_fn=lambda r: (make_body(r, steps=steps), 1),
            )
        )
        row = res.summary()
        if server_hist:
            after = _buckets(proc.metrics())
            for q in (0.5, 0.95, 0.99):
                v = histogram_quantile(q, before, after)
                row[f"server_p{int(q * 100)}_ms"] = None if v is None else round(v * 1e3, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _idle_latencies(port: int, count: int) -> list[float]:
    """Seconds per request, one request at a time."""
    return run(closed_loop("127.0.0.1", port, count))


def max_rate_under_slo(rows: list[dict[str, Any]], slo_ms: float) -> float:
    """Highest arrival rate whose p99 stayed under the SLO with nothing refused or failed."""
    ok = [
        r["rate_rps"]
        for r in rows
        if r["p99_ms"] is not None and r["p99_ms"] <= slo_ms and r["errors"] == 0 and r["rejected"] == 0
    ]
    return max(ok, default=0.0)


def bench_server(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM -> SystemExit, so every `finally: proc.stop()` takes its server down with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-bench-"))
    checkpoint, teacher = args.checkpoint, args.teacher
    fractions = [float(f) for f in args.fractions.split(",")]
    duration = args.duration
    if args.quick:
        from models.placeholder import build_placeholder

        checkpoint = checkpoint or str(build_placeholder(tmp / "tiny"))
        teacher = ""
        fractions, duration = [0.05, 0.15], 1.0
    py = sys.executable
    dev = ["--device", args.device]
    min_requests = 0 if args.quick else args.min_requests
    clock = RawClock(checkpoint, args.device, repeats=3 if args.quick else 7, rounds=1 if args.quick else 3)
    start_ips = 64e3 / clock.ms(64, "start")
    rates = [round(f * start_ips, 2) for f in fractions]  # the sweep's rates: from the start figure
    result: dict[str, Any] = {
        "machine": machine(),
        "fractions": fractions,
        "duration_s": duration,
        "min_requests": min_requests,
    }

    def serve_cmd(ckpt: str) -> list[str]:
        server = [py, "-m", "server.cli", "serve", "--checkpoint", ckpt, *dev]
        return [*server, "--log-level", "warning", "--max-queue-images", "100000"]

    cm_cmd = serve_cmd(checkpoint)

    peers = [p for p in args.peers.split(",") if p]
    specs: dict[str, tuple[list[str], str]] = {
        "cmserve": (cm_cmd, "/readyz"),
        "cmserve_no_batching": ([*cm_cmd, "--max-batch-size", "1", "--buckets", "1"], "/readyz"),
    }
    if "litserve" in peers:
        ls_cmd = [py, "-m", "server.bench_peers", "litserve", "--checkpoint", checkpoint]
        ls_cmd += [
            "--max-batch-size",
            str(args.litserve_max_batch),
            "--batch-timeout",
            str(args.litserve_timeout),
        ]
        specs["litserve"] = (ls_cmd, "/health")
    if "plain" in peers:
        specs["plain"] = ([py, "-m", "server.bench_peers", "plain", "--checkpoint", checkpoint], "/readyz")
    hist = {"cmserve", "cmserve_no_batching"}  # servers with cmserve's own histograms
    procs: dict[str, Proc] = {}
    cfgs: dict[str, dict[str, Any]] = {name: {"sweep": []} for name in specs}
    result["configs"] = cfgs

    def only(name: str | None) -> None:
        """Let one server run and stop (SIGSTOP) the others, so their idle loops take nothing from
        the one being measured (LitServe's idle polling alone uses ~10% of a core here)."""
        for n, proc in procs.items():
            if n == name:
                proc.resume()
            else:
                proc.pause()

    def around(name: str, batch: int, what: str, fn: Callable[[], T]) -> tuple[T, list[float]]:
        """fn() with only `name` running, and the raw sampler timed at `batch` right before and
        right after it with every server stopped; -> (fn's result, [ms before, ms after])."""
        only(None)
        before = clock.ms(batch, f"before {name} {what}")
        only(name)
        out = fn()
        only(None)
        return out, [before, clock.ms(batch, f"after {name} {what}")]

    try:
        # every 2-step server starts at once (start-up is most of a quick run's time) and is then
        # measured rate by rate, all servers at one rate before the next rate: a slow phase of this
        # VM (its speed drifts by tens of %) then lands on every server near the same rate instead
        # of on one server's whole sweep
        with ThreadPoolExecutor(len(specs)) as pool:
            futures = {n: pool.submit(Proc, c, r, tmp / f"{n}.log") for n, (c, r) in specs.items()}
        procs.update({n: f.result() for n, f in futures.items() if f.exception() is None})
        for f in futures.values():
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        for name in hist:  # the max batch size each runs with (auto picks one at warm-up)
            mb = _gauge(procs[name].metrics(), "cmserve_max_batch_size_images")  # all still running
            cfgs[name]["max_batch_size"] = None if mb is None else int(mb)
        for name, proc in procs.items():
            idle_loop = partial(_idle_latencies, proc.port, 10 if args.quick else 60)
            if name == "cmserve":  # the idle overhead's denominator: raw batch 1 around it
                idle, raw_b1 = around(name, 1, "idle", idle_loop)
                cfgs[name]["raw_batch1_ms"] = round(statistics.mean(raw_b1), 3)
            else:
                only(name)
                idle = idle_loop()
            cfgs[name]["idle_p50_ms"] = round(statistics.median(idle) * 1e3, 3)
        for i, rate in enumerate(rates):
            for name, proc in procs.items():
                one_rate = partial(sweep, proc, [rate], duration, name in hist, 2, min_requests)
                # cmserve's rows from half the start raw figure up, and its last, get raw batch 64
                # timed right before and after them: the efficiency's denominator
                if name == "cmserve" and (fractions[i] >= 0.5 or i == len(rates) - 1):
                    rows, raw_ms = around(name, 64, f"at {rate} req/s", one_rate)
                    rows[0]["raw_images_per_s"] = round(statistics.mean(64e3 / ms for ms in raw_ms), 1)
                else:
                    only(name)
                    rows = one_rate()
                cfgs[name]["sweep"].append(rows[0])
        for cfg in cfgs.values():
            cfg["saturation_images_per_s"] = max(r["throughput_images_per_s"] for r in cfg["sweep"])
        cm = cfgs["cmserve"]
        only("cmserve")
        at70 = round(0.7 * cm["saturation_images_per_s"], 2)
        cm["at_70pct"] = sweep(procs["cmserve"], [at70], duration, True, 2, min_requests)[0]
        if "litserve" in cfgs:
            cfgs["litserve"]["settings"] = {
                "max_batch_size": args.litserve_max_batch,
                "batch_timeout_s": args.litserve_timeout,
            }
        for proc in procs.values():
            proc.stop()
        procs.clear()
        clock.close()  # before the teacher's raw timing below: one engine (one OpenMP team) at a time
        if teacher and Path(teacher).is_file():
            t_raw = bench_sampler(teacher, args.device, ["auto"], [64], [32], repeats=2)[0]
            result["teacher_raw_images_per_s"] = t_raw["images_per_s"]
            proc = Proc(serve_cmd(teacher), "/readyz", tmp / "teacher32.log")
            try:
                # the teacher's rates are below 10 req/s: 200 requests each would take minutes per
                # rate, and none of the targets is about its tail
                t_rates = [round(f * t_raw["images_per_s"], 2) for f in fractions]
                t_sweep = sweep(proc, t_rates, duration, True, 32)
            finally:
                proc.stop()
            cfgs["teacher32"] = {
                "idle_p50_ms": None,
                "sweep": t_sweep,
                "saturation_images_per_s": max(r["throughput_images_per_s"] for r in t_sweep),
            }
    finally:
        clock.close()
        for leftover in procs.values():  # only after an error
            leftover.stop()
    slo_ms = round(3 * cm["idle_p50_ms"], 1)
    result["slo_ms"] = slo_ms
    # the saturation row's own raw figure, or the nearest bracketed row's
    sat_i = max(range(len(cm["sweep"])), key=lambda i: cm["sweep"][i]["throughput_images_per_s"])
    bracketed = [i for i, r in enumerate(cm["sweep"]) if "raw_images_per_s" in r]
    cm["raw_images_per_s"] = cm["sweep"][min(bracketed, key=lambda i: abs(i - sat_i))]["raw_images_per_s"]
    result["raw_checks"] = clock.checks
    for cfg in result["configs"].values():
        cfg["max_rate_under_slo"] = max_rate_under_slo(cfg["sweep"], slo_ms)
    c = result["configs"]
    result.update(
        {
            "raw_batch1_ms": cm["raw_batch1_ms"],
            "raw_images_per_s": cm["raw_images_per_s"],
            "saturation_images_per_s": cm["saturation_images_per_s"],
            "efficiency": round(cm["saturation_images_per_s"] / cm["raw_images_per_s"], 3),
            "idle_overhead_ms": round(cm["idle_p50_ms"] - cm["raw_batch1_ms"], 3),
            "p99_over_p50_at_70pct": (
                round(cm["at_70pct"]["p99_ms"] / cm["at_70pct"]["p50_ms"], 3)
                if cm["at_70pct"]["p50_ms"]
                else None
            ),
            "max_rate_under_slo": {k: v["max_rate_under_slo"] for k, v in c.items()},
        }
    )
    print(json.dumps({k: v for k, v in result.items() if k != "configs"}), flush=True)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The README's tables from a `bench server` result."""
    rows = [
        "| config | idle p50 ms | saturation images/s | max rate under SLO (req/s) |",
        "|---|---|---|---|",
    ]
    for name, cfg in result["configs"].items():
        rows.append(
            f"| {name} | {cfg['idle_p50_ms']} | {cfg['saturation_images_per_s']} | "
            f"{cfg['max_rate_under_slo']} |"
        )
    sweep = [
        "| config | rate req/s | achieved img/s | p50 ms | p95 ms | p99 ms | server p99 ms | 429/503 | err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in result["configs"].items():
        for r in cfg["sweep"]:
            sweep.append(
                f"| {name} | {r['rate_rps']} | {r['throughput_images_per_s']} | {r['p50_ms']} | "
                f"{r['p95_ms']} | {r['p99_ms']} | {r.get('server_p99_ms', '')} | {r['rejected']} | "
                f"{r['errors']} |"
            )
    return "\n".join(rows) + "\n\n" + "\n".join(sweep) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cfg in result["configs"].items():
        pts = [(r["throughput_images_per_s"], r["p99_ms"]) for r in cfg["sweep"] if r["p99_ms"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(result["slo_ms"], color="gray", ls="--", label=f"SLO p99 {result['slo_ms']} ms")
    ax.set_xlabel("achieved throughput (images/s)")
    ax.set_ylabel("client p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title(
        f"open-loop sweep, {result['machine'].get('gpu', 'CPU')} ({result['machine']['cores']} cores)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> None:
    if args.what == "kernels":
        import torch

        from kernels.bench import run

        if not torch.cuda.is_available():
            sys.exit("bench kernels needs a CUDA GPU")
        result: dict[str, Any] = {"machine": machine(), "rows": run("cuda", args.quick)}
    elif args.what == "threads":
        from server.bench_threads import run as run_threads

        batches = [int(b) for b in args.batches.split(",")]
        rows = run_threads(args.checkpoint, batches, args.repeats, args.rounds)
        result = {"machine": machine(), "rows": rows}
    elif args.what == "sampler":
        import torch

        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        default = ["eager", "graph"] if cuda else ["eager"]
        backends = args.backends.split(",") if args.backends else default
        buckets = [1, 8, 64] if args.quick else [int(b) for b in args.buckets.split(",")]
        steps = [2] if args.quick else [int(s) for s in args.steps.split(",")]
        ckpt = args.checkpoint
        if args.quick and not ckpt:
            from models.placeholder import build_placeholder

            ckpt = str(build_placeholder(Path(tempfile.mkdtemp()) / "tiny"))
        result = {
            "machine": machine(),
            "rows": bench_sampler(
                ckpt,
                args.device,
                backends,
                buckets,
                steps,
                2 if args.quick else args.repeats,
                rounds=1 if args.quick else args.rounds,
            ),
        }
    else:
        result = bench_server(args)
        print(markdown(result))
        if args.plot:
            plot(result, args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
