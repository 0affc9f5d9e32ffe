"""`cmserve bench server`: real server processes under open-loop Poisson load, swept past
saturation — cmserve with batching on and off, LitServe and a plain FastAPI endpoint on the same
checkpoint, and the 32-step teacher; throughput, client p50/p95/p99, the server's own histogram
quantiles, errors and rejections per rate; a latency-vs-throughput plot.

The steps, in order (`ServerBench.run`): start every 2-step server at once, idle latency, the
rate sweep (all servers at one rate before the next), cmserve at 70 % of its saturation, the
teacher's own sweep, the summary; `markdown` and `plot` report it.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench.loadgen import ClientProcesses, closed_loop, run
from bench.procs import Proc, histogram_buckets, sample_sum, stop_live
from bench.sampler import RawClock, bench_sampler, machine

T = TypeVar("T")
REQUEST_HISTOGRAM = "cmserve_request_duration_seconds"


def has_histograms(name: str) -> bool:
    """Whether the server reports cmserve's own histograms (every cmserve configuration)."""
    return name.startswith("cmserve")


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


def _request_buckets(proc: Proc) -> dict[float, float]:
    return histogram_buckets(proc.metrics(), REQUEST_HISTOGRAM, route="/v1/generate")


def sweep(
    proc: Proc,
    rates: list[float],
    duration: float,
    server_hist: bool,
    steps: int = 2,
    min_requests: int = 0,
    classes: int = 10,
    clients: ClientProcesses | None = None,
) -> list[dict[str, Any]]:
    """Each rate runs for `duration` s, longer where that would send fewer than `min_requests`
    (at 9 req/s, 5 s is 45 requests: their p99 would be their maximum), sent by `clients` (one
    process without)."""
    clients = clients or ClientProcesses(1)
    rows = []
    for rate in rates:
        before = _request_buckets(proc) if server_hist else {}
        res = clients.open_loop(proc.port, rate, max(duration, min_requests / rate), steps, classes)
        row = res.summary()
        if server_hist:
            after = _request_buckets(proc)
            for q in (0.5, 0.95, 0.99):
                v = histogram_quantile(q, before, after)
                row[f"server_p{int(q * 100)}_ms"] = None if v is None else round(v * 1e3, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def max_rate_under_slo(rows: list[dict[str, Any]], slo_ms: float) -> float:
    """Highest arrival rate whose p99 stayed under the SLO with nothing refused or failed."""
    ok = [
        r["rate_rps"]
        for r in rows
        if r["p99_ms"] is not None and r["p99_ms"] <= slo_ms and r["errors"] == 0 and r["rejected"] == 0
    ]
    return max(ok, default=0.0)


def server_specs(args: argparse.Namespace, checkpoint: str) -> dict[str, tuple[list[str], str]]:
    """name -> (command without --port, readiness path) of every 2-step server: cmserve with and
    without batching, and the peers asked for."""
    py = sys.executable
    cm_cmd = serve_cmd(checkpoint, args.device)
    specs = {
        "cmserve": (cm_cmd, "/readyz"),
        "cmserve_no_batching": ([*cm_cmd, "--max-batch-size", "1", "--buckets", "1"], "/readyz"),
    }
    if args.frontends > 1:  # the same server with front-end processes of their own
        specs[f"cmserve_{args.frontends}fe"] = ([*cm_cmd, "--frontends", str(args.frontends)], "/readyz")
    peers = [p for p in args.peers.split(",") if p]
    if "litserve" in peers:
        ls_cmd = [py, "-m", "bench.peers", "litserve", "--checkpoint", checkpoint]
        ls_cmd += [
            "--max-batch-size",
            str(args.litserve_max_batch),
            "--batch-timeout",
            str(args.litserve_timeout),
        ]
        specs["litserve"] = (ls_cmd, "/health")
    if "plain" in peers:
        specs["plain"] = ([py, "-m", "bench.peers", "plain", "--checkpoint", checkpoint], "/readyz")
    return specs


def serve_cmd(ckpt: str, device: str) -> list[str]:
    server = [sys.executable, "-m", "server.cli", "serve", "--checkpoint", ckpt, "--device", device]
    return [*server, "--log-level", "warning", "--max-queue-images", "100000"]


class ServerBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="cmserve-bench-"))
        self.checkpoint, self.teacher = args.checkpoint, args.teacher
        fractions = args.fractions or ("0.05,0.15" if args.quick else "0.05,0.1,0.2,0.35,0.5,0.7,1.0,1.3")
        self.fractions = [float(f) for f in fractions.split(",")]
        self.duration = args.duration
        if args.quick:
            from models.placeholder import build_placeholder

            self.checkpoint = self.checkpoint or str(build_placeholder(self.tmp / "tiny"))
            self.teacher = ""
            self.duration = 1.0
        self.min_requests = 0 if args.quick else args.min_requests
        self.procs: dict[str, Proc] = {}
        self.cfgs: dict[str, dict[str, Any]] = {}
        self.clients: ClientProcesses | None = None  # the load's client processes

    # -- helpers ---------------------------------------------------------------------------------
    def only(self, name: str | None) -> None:
        """Let one server run and stop (SIGSTOP) the others, so their idle loops take nothing from
        the one being measured (LitServe's idle polling alone uses ~10% of a core on 2 cores)."""
        for n, proc in self.procs.items():
            if n == name:
                proc.resume()
            else:
                proc.pause()

    def around(self, name: str, batch: int, what: str, fn: Callable[[], T]) -> tuple[T, list[float]]:
        """fn() with only `name` running, and the raw sampler timed at `batch` right before and
        right after it with every server stopped; -> (fn's result, [ms before, ms after])."""
        self.only(None)
        before = self.clock.ms(batch, f"before {name} {what}")
        self.only(name)
        out = fn()
        self.only(None)
        return out, [before, self.clock.ms(batch, f"after {name} {what}")]

    # -- steps -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Every 2-step server at once (start-up is most of a quick run's time); then the max
        batch size each cmserve runs with (auto picks one at warm-up), read while all run."""
        specs = server_specs(self.args, self.checkpoint)
        self.cfgs.update({name: {"sweep": []} for name in specs})
        # several servers warming up (and timing their buckets) at once share the cores: each
        # takes several times what it does alone
        timeout = 180.0 * len(specs)
        with ThreadPoolExecutor(len(specs)) as pool:
            futures = {
                n: pool.submit(Proc, c, r, self.tmp / f"{n}.log", timeout) for n, (c, r) in specs.items()
            }
        self.procs.update({n: f.result() for n, f in futures.items() if f.exception() is None})
        for f in futures.values():
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        for name in filter(has_histograms, self.procs):
            mb = sample_sum(self.procs[name].metrics(), "cmserve_max_batch_size_images")
            self.cfgs[name]["max_batch_size"] = None if mb is None else int(mb)

    def idle(self) -> None:
        """One request at a time; for cmserve, raw batch 1 timed around it (the idle overhead's
        denominator)."""
        for name, proc in self.procs.items():
            count = 10 if self.args.quick else 60
            loop = partial(run, closed_loop("127.0.0.1", proc.port, count, classes=self.classes))
            if name == "cmserve":
                idle, raw_b1 = self.around(name, 1, "idle", loop)
                self.cfgs[name]["raw_batch1_ms"] = round(statistics.mean(raw_b1), 3)
            else:
                self.only(name)
                idle = loop()
            self.cfgs[name]["idle_p50_ms"] = round(statistics.median(idle) * 1e3, 3)

    def rate_sweep(self, rates: list[float]) -> None:
        """All servers at one rate before the next: a slow phase of a drifting VM then lands on
        every server near the same rate instead of on one server's whole sweep. cmserve's rows
        from half the start raw figure up, and its last, get raw batch 64 timed right before and
        after them (the efficiency's denominator)."""
        for i, rate in enumerate(rates):
            for name, proc in self.procs.items():
                one_rate = partial(
                    sweep,
                    proc,
                    [rate],
                    self.duration,
                    has_histograms(name),
                    2,
                    self.min_requests,
                    self.classes,
                    self.clients,
                )
                if name == "cmserve" and (self.fractions[i] >= 0.5 or i == len(rates) - 1):
                    rows, raw_ms = self.around(name, 64, f"at {rate} req/s", one_rate)
                    rows[0]["raw_images_per_s"] = round(statistics.mean(64e3 / ms for ms in raw_ms), 1)
                else:
                    self.only(name)
                    rows = one_rate()
                self.cfgs[name]["sweep"].append(rows[0])
        for cfg in self.cfgs.values():
            cfg["saturation_images_per_s"] = max(r["throughput_images_per_s"] for r in cfg["sweep"])

    def at_70pct(self) -> None:
        cm = self.cfgs["cmserve"]
        self.only("cmserve")
        at70 = round(0.7 * cm["saturation_images_per_s"], 2)
        cm["at_70pct"] = sweep(
            self.procs["cmserve"],
            [at70],
            self.duration,
            True,
            2,
            self.min_requests,
            self.classes,
            self.clients,
        )[0]
        if "litserve" in self.cfgs:
            self.cfgs["litserve"]["settings"] = {
                "max_batch_size": self.args.litserve_max_batch,
                "batch_timeout_s": self.args.litserve_timeout,
            }

    def stop_servers(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()

    def teacher_sweep(self, result: dict[str, Any]) -> None:
        """The 32-step teacher alone, at the same fractions of its own raw rate (below 10 req/s:
        200 requests per rate would take minutes, and no target is about its tail)."""
        if not (self.teacher and Path(self.teacher).is_file()):
            return
        t_raw = bench_sampler(self.teacher, self.args.device, ["auto"], [64], [32], repeats=2)[0]
        result["teacher_raw_images_per_s"] = t_raw["images_per_s"]
        proc = Proc(serve_cmd(self.teacher, self.args.device), "/readyz", self.tmp / "teacher32.log")
        try:
            t_rates = [round(f * t_raw["images_per_s"], 2) for f in self.fractions]
            t_sweep = sweep(proc, t_rates, self.duration, True, 32)
        finally:
            proc.stop()
        self.cfgs["teacher32"] = {
            "idle_p50_ms": None,
            "sweep": t_sweep,
            "saturation_images_per_s": max(r["throughput_images_per_s"] for r in t_sweep),
        }

    def summary(self, result: dict[str, Any]) -> None:
        cm = self.cfgs["cmserve"]
        slo_ms = round(3 * cm["idle_p50_ms"], 1)
        result["slo_ms"] = slo_ms
        # the saturation row's own raw figure, or the nearest bracketed row's
        sat_i = max(range(len(cm["sweep"])), key=lambda i: cm["sweep"][i]["throughput_images_per_s"])
        bracketed = [i for i, r in enumerate(cm["sweep"]) if "raw_images_per_s" in r]
        cm["raw_images_per_s"] = cm["sweep"][min(bracketed, key=lambda i: abs(i - sat_i))]["raw_images_per_s"]
        result["raw_checks"] = self.clock.checks
        for cfg in self.cfgs.values():
            cfg["max_rate_under_slo"] = max_rate_under_slo(cfg["sweep"], slo_ms)
        at70 = cm["at_70pct"]
        result.update(
            {
                "raw_batch1_ms": cm["raw_batch1_ms"],
                "raw_images_per_s": cm["raw_images_per_s"],
                "saturation_images_per_s": cm["saturation_images_per_s"],
                "efficiency": round(cm["saturation_images_per_s"] / cm["raw_images_per_s"], 3),
                "idle_overhead_ms": round(cm["idle_p50_ms"] - cm["raw_batch1_ms"], 3),
                "p99_over_p50_at_70pct": round(at70["p99_ms"] / at70["p50_ms"], 3)
                if at70["p50_ms"]
                else None,
                "max_rate_under_slo": {k: v["max_rate_under_slo"] for k, v in self.cfgs.items()},
            }
        )

    def run(self) -> dict[str, Any]:
        # SIGTERM -> SystemExit, so every `finally` takes its servers down with us
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        a = self.args
        self.clock = RawClock(
            self.checkpoint, a.device, repeats=3 if a.quick else 7, rounds=1 if a.quick else 3
        )
        self.classes = self.clock.e.card.num_classes  # what the request bodies may name
        start_ips = 64e3 / self.clock.ms(64, "start")
        rates = [round(f * start_ips, 2) for f in self.fractions]  # the sweep's rates: from the start figure
        result: dict[str, Any] = {
            "machine": machine(),
            "fractions": self.fractions,
            "duration_s": self.duration,
            "min_requests": self.min_requests,
            "clients": a.clients,
            "configs": self.cfgs,
        }
        self.clients = ClientProcesses(a.clients)
        try:
            self.start()
            self.idle()
            self.rate_sweep(rates)
            self.at_70pct()
            self.stop_servers()
            self.clock.close()  # before the teacher's raw timing: one engine (one OpenMP team) at a time
            self.teacher_sweep(result)
        finally:
            self.clock.close()
            self.stop_servers()  # only after an error is anything left
            stop_live()  # servers still starting (start's threads) when an error or SIGTERM came
            self.clients.close()
        self.summary(result)
        print(json.dumps({k: v for k, v in result.items() if k != "configs"}), flush=True)
        return result


def markdown(result: dict[str, Any]) -> str:
    """The summary and per-rate tables of a `bench server` result."""
    rows = [
        "| config | idle p50 ms | saturation images/s | max rate under SLO (req/s) |",
        "|---|---|---|---|",
    ]
    for name, cfg in result["configs"].items():
        cells = [name, cfg["idle_p50_ms"], cfg["saturation_images_per_s"], cfg["max_rate_under_slo"]]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    table = [
        "| config | rate req/s | achieved img/s | p50 ms | p95 ms | p99 ms | server p99 ms | 429/503 | err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in result["configs"].items():
        for r in cfg["sweep"]:
            table.append(
                f"| {name} | {r['rate_rps']} | {r['throughput_images_per_s']} | {r['p50_ms']} | "
                f"{r['p95_ms']} | {r['p99_ms']} | {r.get('server_p99_ms', '')} | {r['rejected']} | "
                f"{r['errors']} |"
            )
    return "\n".join(rows) + "\n\n" + "\n".join(table) + "\n"


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
