"""`cmserve bench quality`: cost per accepted output, per tier and reject policy, and what
degrading buys under overload.

One server (the shipped model, its teacher as the reference tier, the LeNet accept check):

1. per tier (fast, standard, high, reference) and policy (return, resample, escalate): requests
   of n images one after another; from the server's own counters, compute ms per image drawn,
   the share of returned images accepted, and compute seconds per accepted image;
2. under open-loop overload (a multiple of the standard tier's saturation) with a latency
   objective: the same arrivals with `allow_degrade` false, then true; p50/p99, the share of
   requests degraded, and the acceptance of what was returned;
3. shadow mode's toll on the foreground: the same arrivals at 70 % of saturation against this
   server and a second one with `--shadow-fraction 1.0` (each paused while the other runs).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import concurrent_loop, open_loop, run
from bench.procs import Proc, sample_sum

TIERS = ("fast", "standard", "high", "reference")
POLICIES = ("return", "resample", "escalate")
COMPUTE, DRAWN = "cmserve_tier_compute_seconds_total", "cmserve_tier_images_total"


def _counter(proc: Proc, name: str) -> float:
    return sample_sum(proc.metrics(), name) or 0.0


def tier_row(proc: Proc, tier: str, policy: str, requests: int, n: int, seed: int) -> dict[str, Any]:
    """`requests` requests of `n` images at `tier` under `policy`, one at a time."""
    before = {
        k: _counter(proc, k) for k in ("cmserve_tier_compute_seconds_total", "cmserve_tier_images_total")
    }
    rng = random.Random(seed)
    accepted = returned = 0
    attempts: list[int] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=600) as c:
        for _ in range(requests):
            # allow_degrade off: the tier asked is the tier measured, whatever the objective
            body = {"class_label": rng.randrange(10), "n": n, "seed": rng.randrange(2**31),
                    "quality": tier, "on_reject": policy, "allow_degrade": False}  # fmt: skip
            r = c.post("/v1/generate", json=body)
            r.raise_for_status()
            for d in r.json()["data"]:
                returned += 1
                accepted += bool(d["accepted"])
                attempts.append(d["attempts"])
    compute = (
        _counter(proc, "cmserve_tier_compute_seconds_total") - before["cmserve_tier_compute_seconds_total"]
    )
    drawn = _counter(proc, "cmserve_tier_images_total") - before["cmserve_tier_images_total"]
    return {
        "tier": tier,
        "policy": policy,
        "images_returned": returned,
        "images_drawn": int(drawn),
        "ms_per_image_drawn": round(compute / drawn * 1e3, 3),
        "acceptance": round(accepted / returned, 4),
        "compute_s_per_accepted": round(compute / accepted, 5) if accepted else None,
        "mean_attempts": round(sum(attempts) / len(attempts), 3),
    }


def shadow_rows(procs: dict[str, Proc], rate: float, seconds: float) -> list[dict[str, Any]]:
    """Standard-tier requests at `rate` against each server in turn, the other paused."""
    rows = []
    for name, proc in procs.items():
        for other in procs.values():
            (other.resume if other is proc else other.pause)()
        row = overload_row(proc, rate, seconds, False, seed=13)
        text = proc.metrics()
        row = {"shadow_fraction": 1.0 if name == "shadow" else 0.0, **row}
        row["shadow_comparisons"] = int(sample_sum(text, "cmserve_shadow_comparisons_total") or 0)
        agree = sample_sum(text, "cmserve_shadow_comparisons_total", agree="true") or 0
        row["shadow_agreement"] = (
            round(agree / row["shadow_comparisons"], 4) if row["shadow_comparisons"] else None
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    for proc in procs.values():
        proc.resume()
    return rows


def overload_row(proc: Proc, rate: float, seconds: float, degrade: bool, seed: int) -> dict[str, Any]:
    """Open-loop standard-tier requests at `rate`; what came back and how fast."""
    seen = {"degraded": 0, "answers": 0, "accepted": 0, "images": 0}

    def body(rng: random.Random) -> tuple[bytes, int]:
        b = {"class_label": rng.randrange(10), "seed": rng.randrange(2**31), "quality": "standard",
             "allow_degrade": degrade}  # fmt: skip
        return json.dumps(b).encode(), 1

    def answer(status: int, payload: bytes) -> None:
        if status != 200:
            return
        out = json.loads(payload)
        seen["answers"] += 1
        seen["degraded"] += out["degraded"]
        for d in out["data"]:
            seen["images"] += 1
            seen["accepted"] += bool(d["accepted"])

    res = run(open_loop("127.0.0.1", proc.port, rate, seconds, seed=seed, body_fn=body, on_answer=answer))
    s = res.summary()
    return {
        "allow_degrade": degrade,
        "rate_rps": round(rate, 2),
        "sent": s["sent"],
        "ok": s["ok"],
        "rejected": s["rejected"],
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "degraded_share": round(seen["degraded"] / max(1, seen["answers"]), 4),
        "acceptance": round(seen["accepted"] / max(1, seen["images"]), 4),
    }


def bench_quality(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-quality-"))
    cmd = [sys.executable, "-m", "server.cli", "serve", "--device", args.device, "--log-level", "warning",
           "--max-attempts", "3", "--latency-slo-ms", str(args.slo_ms), "--max-queue-images", "100000",
           "--max-timeout-s", "600", "--default-timeout-s", "600"]  # fmt: skip
    # a pinned max batch: auto re-times at each start, and the two servers compared must match
    cmd += ["--buckets", "1,2,4,8", "--max-batch-size", "8"] if args.quick else ["--max-batch-size", "32"]
    proc = Proc(cmd, "/readyz", tmp / "server.log", ready_timeout=600)
    result: dict[str, Any] = {"slo_ms": args.slo_ms, "n": args.n, "requests": args.requests, "tiers": []}
    try:
        tiers = ("fast", "reference") if args.quick else TIERS
        for tier in tiers:
            # at the top tier escalate has nowhere to go: it is return
            for policy in POLICIES if tier != "reference" else ("return", "resample"):
                requests = max(1, args.requests // (4 if tier == "reference" else 1))
                row = tier_row(proc, tier, policy, requests, args.n, seed=len(result["tiers"]))
                result["tiers"].append(row)
                print(json.dumps(row), flush=True)
        standard = lambda r: (json.dumps({"class_label": r.randrange(10), "quality": "standard"}).encode(), 1)  # noqa: E731
        sat_run = run(concurrent_loop("127.0.0.1", proc.port, 64, args.duration, seed=7, body_fn=standard))
        sat = len(sat_run.latencies_ok) / sat_run.wall_s
        result["saturation_rps"] = round(sat, 2)
        result["overload"] = []
        for degrade in (False, True):  # the same arrivals (same seed) each time
            row = overload_row(proc, args.overload * sat, args.duration, degrade, seed=11)
            result["overload"].append(row)
            print(json.dumps(row), flush=True)
        proc.pause()
        shadow = Proc([*cmd, "--shadow-fraction", "1.0"], "/readyz", tmp / "shadow.log", ready_timeout=600)
        try:
            result["shadow"] = shadow_rows({"plain": proc, "shadow": shadow}, 0.7 * sat, args.duration)
        finally:
            shadow.stop()
    finally:
        proc.stop()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| tier | policy | ms / image drawn | acceptance | compute s / accepted image | draws per image |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["tiers"]:
        lines.append(
            f"| {r['tier']} | {r['policy']} | {r['ms_per_image_drawn']} | {r['acceptance'] * 100:.1f} % | "
            f"{r['compute_s_per_accepted']} | {r['mean_attempts']} |"
        )
    if "overload" in result:
        sat, slo = result["saturation_rps"], result["slo_ms"]
        lines += [
            f"\nOverload at {result['overload'][0]['rate_rps']} req/s (standard tier saturates at {sat} "
            f"req/s), latency objective {slo:g} ms:\n",
            "| allow_degrade | answered | p50 ms | p99 ms | degraded | acceptance |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["overload"]:
            lines.append(
                f"| {str(r['allow_degrade']).lower()} | {r['ok']} of {r['sent']} | {r['p50_ms']} | "
                f"{r['p99_ms']} | {r['degraded_share'] * 100:.1f} % | {r['acceptance'] * 100:.1f} % |"
            )
    if "shadow" in result:
        lines += [
            "\nShadow mode at 70 % of saturation (same arrivals):\n",
            "| shadow fraction | answered | p50 ms | p99 ms | shadow comparisons | agreement |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["shadow"]:
            agree = "—" if r["shadow_agreement"] is None else f"{r['shadow_agreement'] * 100:.1f} %"
            lines.append(
                f"| {r['shadow_fraction']} | {r['ok']} of {r['sent']} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['shadow_comparisons']} | {agree} |"
            )
    return "\n".join(lines)
