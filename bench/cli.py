"""`cmserve bench sampler|server|frontend|threads|kernels`: the server against its limit and its peers.

sampler  the raw sampler, no HTTP (bench/sampler.py)
batching request- against step-level batching on mixed workloads (bench/batching.py)
frontend requests/s per front-end core with a stub model, against the peers (bench/frontend.py)
server   real servers under open-loop load, swept past saturation, against LitServe and a plain
         FastAPI endpoint (bench/load.py)
threads  a CPU batch on the engine's one thread vs sharing the process (bench/threads.py)
kernels  the Triton kernels against torch (GPU only; kernels/bench.py)
Results print as JSON lines; --json writes the whole result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "models" / "weights" / "teacher-mnist.json"


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sampler", help="raw sampler throughput (no HTTP)")
    s.add_argument("--checkpoint", default="", help="one model to time (any layout `serve` loads)")
    s.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model to time, repeatable: each gets the same rows (PATH: a cmserve checkpoint or a "
        "diffusers ConsistencyModelPipeline directory); default the shipped model",
    )
    s.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    s.add_argument(
        "--backends", default="", help="comma list of eager,graph; default eager on CPU, both on CUDA"
    )
    s.add_argument("--buckets", default="1,2,4,8,16,32,64", help="batch sizes to time, comma-separated")
    s.add_argument("--steps", default="1,2,4", help="step counts to time, comma-separated")
    s.add_argument("--repeats", type=int, default=5, help="timed batches per figure (median)")
    s.add_argument("--rounds", type=int, default=3, help="rounds over all figures; the best round counts")
    s.add_argument("--quick", action="store_true", help="a short run that keeps the harness working")
    s.add_argument("--json", default="", help="also write the whole result as JSON here")
    v = sub.add_parser("server", help="open-loop load sweep against real servers")
    v.add_argument(
        "--checkpoint",
        "--model",
        dest="checkpoint",
        default="",
        help="the model every server serves: a cmserve checkpoint or a diffusers directory",
    )
    v.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="the 32-step teacher for its own sweep")
    v.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    v.add_argument(
        "--fractions",
        default="",
        help="arrival rates as fractions of the raw sampler's images/s (default "
        "0.05,0.1,0.2,0.35,0.5,0.7,1.0,1.3; with --quick 0.05,0.15)",
    )
    v.add_argument("--duration", type=float, default=5.0, help="seconds per arrival rate")
    v.add_argument(
        "--min-requests", type=int, default=200, help="run a rate longer if it would send fewer requests"
    )
    v.add_argument("--peers", default="litserve,plain", help="peer servers to run beside cmserve")
    v.add_argument(
        "--clients", type=int, default=1,
        help="processes sending the open-loop load, each at rate/clients (one event loop sends a few "
        "thousand requests per second at most)",
    )  # fmt: skip
    v.add_argument(
        "--frontends", type=int, default=1, help="also run cmserve with this many front-end processes (> 1)"
    )
    v.add_argument("--litserve-max-batch", type=int, default=32, help="LitServe's max_batch_size")
    v.add_argument("--litserve-timeout", type=float, default=0.005, help="LitServe's batch_timeout (s)")
    v.add_argument(
        "--quick", action="store_true", help="tiny model, 2 rates, short runs: keeps the harness working"
    )
    v.add_argument("--json", default="", help="also write the whole result as JSON here")
    v.add_argument("--plot", default="", help="write the latency-vs-throughput plot (PNG) here")
    t = sub.add_parser("threads", help="CPU batch time on one thread vs sharing the process")
    t.add_argument("--checkpoint", default="", help="the model to time (default: the shipped one)")
    t.add_argument("--batches", default="1,8,64", help="batch sizes to time, comma-separated")
    t.add_argument("--repeats", type=int, default=9, help="timed batches per figure (median)")
    t.add_argument("--rounds", type=int, default=2, help="rounds over all figures; the best counts")
    t.add_argument("--json", default="", help="also write the whole result as JSON here")
    f = sub.add_parser("frontend", help="requests/s per front-end core with a model that answers at once")
    f.add_argument("--checkpoint", default="", help="model shape to stub (default: the tiny placeholder)")
    f.add_argument("--concurrency", type=int, default=64, help="requests kept in flight")
    f.add_argument("--duration", type=float, default=5.0, help="seconds per server")
    f.add_argument(
        "--peers",
        default="litserve,plain",
        help="servers to run beside cmserve: litserve, plain (a bare FastAPI route), fastapi_routes "
        "(cmserve without its short path for the generate routes), default_gc (cmserve with CPython's "
        "default garbage collector settings), h11 (cmserve with uvicorn's pure-Python HTTP parser)",
    )
    f.add_argument("--frontends", default="1,2", help="cmserve's front-end process counts to run")
    f.add_argument("--clients", type=int, default=1, help="load-generating processes")
    f.add_argument("--quick", action="store_true", help="a short run that keeps the harness working")
    f.add_argument("--json", default="", help="also write the whole result as JSON here")
    b = sub.add_parser("batching", help="request- vs step-level batching on mixed workloads")
    b.add_argument("--checkpoint", default="", help="the consistency model (default: the shipped one)")
    b.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="the 32-step teacher served beside it")
    b.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    b.add_argument("--loads", default="0.5,0.7,0.9", help="arrival rates as fractions of saturation")
    b.add_argument("--duration", type=float, default=20.0, help="seconds per rate and mode")
    b.add_argument("--max-batch-size", type=int, default=0, help="both servers' (0: each picks its own)")
    b.add_argument("--quick", action="store_true", help="tiny model, one workload, short runs")
    b.add_argument("--json", default="", help="also write the whole result as JSON here")
    q = sub.add_parser("quality", help="cost per accepted image per tier and policy; degrade under overload")
    q.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    q.add_argument("--requests", type=int, default=40, help="requests per tier and policy (reference: 1/4)")
    q.add_argument("-n", type=int, default=8, help="images per request")
    q.add_argument("--slo-ms", type=float, default=500.0, help="the server's --latency-slo-ms")
    q.add_argument("--overload", type=float, default=2.0, help="arrival rate as a multiple of saturation")
    q.add_argument(
        "--duration", type=float, default=20.0, help="seconds of saturation and of each overload run"
    )
    q.add_argument("--quick", action="store_true", help="two tiers, short runs: keeps the harness working")
    q.add_argument("--json", default="", help="also write the whole result as JSON here")
    k = sub.add_parser("kernels", help="Triton kernels vs torch (CUDA only)")
    k.add_argument("--quick", action="store_true", help="a short run that keeps the harness working")
    k.add_argument("--json", default="", help="also write the whole result as JSON here")


def run_sampler(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.sampler import bench_sampler, machine

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    backends = args.backends.split(",") if args.backends else (["eager", "graph"] if cuda else ["eager"])
    buckets = [1, 8, 64] if args.quick else [int(b) for b in args.buckets.split(",")]
    steps = [2] if args.quick else [int(s) for s in args.steps.split(",")]
    ckpt = args.checkpoint
    if args.quick and not ckpt:
        from models.placeholder import build_placeholder

        ckpt = str(build_placeholder(Path(tempfile.mkdtemp()) / "tiny"))
    rows = bench_sampler(
        ckpt, args.device, backends, buckets, steps, 2 if args.quick else args.repeats,
        rounds=1 if args.quick else args.rounds, models=args.models,
    )  # fmt: skip
    return {"machine": machine(), "rows": rows}


def main(args: argparse.Namespace) -> None:
    from bench.sampler import machine

    if args.what == "kernels":
        import torch

        from kernels.bench import run

        if not torch.cuda.is_available():
            sys.exit("bench kernels needs a CUDA GPU")
        result: dict[str, Any] = {"machine": machine(), "rows": run("cuda", args.quick)}
    elif args.what == "threads":
        from bench.threads import run as run_threads

        batches = [int(b) for b in args.batches.split(",")]
        result = {
            "machine": machine(),
            "rows": run_threads(args.checkpoint, batches, args.repeats, args.rounds),
        }
    elif args.what == "sampler":
        result = run_sampler(args)
    elif args.what == "batching":
        from bench.batching import bench_batching
        from bench.batching import markdown as batching_markdown

        if args.quick:
            args.loads, args.duration = "0.5", 2.0
        result = {"machine": machine(), **bench_batching(args)}
        print(batching_markdown(result))
    elif args.what == "quality":
        from bench.quality import bench_quality
        from bench.quality import markdown as quality_markdown

        if args.quick:
            args.requests, args.n, args.duration = 4, 4, 2.0
        result = {"machine": machine(), **bench_quality(args)}
        print(quality_markdown(result))
    elif args.what == "frontend":
        from bench.frontend import bench_frontend
        from bench.frontend import markdown as frontend_markdown

        result = bench_frontend(args)
        print(frontend_markdown(result))
    else:
        from bench.load import ServerBench, markdown, plot

        result = ServerBench(args).run()
        print(markdown(result))
        if args.plot:
            plot(result, args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
