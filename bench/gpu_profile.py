"""Where a preset's sampler spends its time: one batch under torch.profiler, each kernel's time
summed by class (dense matmuls, attention, norms, copies, the rest), with the matmuls' and
attention's own TFLOP/s.

The model part (bench/gpu_model.py) says how far a batch is from its roofline; this says what
holds the gap. The kernels' summed time against the batch's wall time separates slow kernels
(sum ≈ wall) from time between kernels (launches, the host: sum ≪ wall). On CUDA both the eager
call and the captured graph's replay are profiled; off CUDA, a harness check, each op's own CPU
time stands in for a kernel's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from torch.autograd import DeviceType

import kernels
from bench.gpu_model import sampler_fn
from bench.roofline import wall_median
from models.config import PRESETS
from models.consistency import SIGMA_D, TrigFlow
from models.placeholder import random_dit

# (class, substrings of a kernel's or op's lower-cased name): the first class that matches wins.
# Names are cuBLAS's (gemm, nvjet, xmma, cutlass), Triton's (our kernels' function names) and
# aten's (off CUDA, and for torch's own fallbacks).
CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("_attention_kernel", "flash", "fmha", "attention", "softmax", "bmm")),
    ("norm", ("_adaln_norm", "_gated_residual", "layer_norm", "rms_norm")),
    ("quantize", ("_quantize_rows_fp8",)),  # float8 activations (models/fp8.py)
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "addmm", "aten::mm", "scaled_mm", "conv")),
    ("copy", ("memcpy", "memset", "copy_")),
]
CLASS_NAMES = [c for c, _ in CLASSES] + ["other"]


def classify(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CLASSES if any(k in low for k in keys)), "other")


def kernel_times(prof: Any, device: torch.device) -> list[tuple[str, float]]:
    """(name, µs) per kernel the profiled call ran: device events on CUDA; elsewhere each op's own
    CPU time (its time less its children's), which sums to the ops' total."""
    if device.type == "cuda":
        events = prof.events()
        return [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    return [
        (e.name, e.self_cpu_time_total)
        for e in prof.events()
        if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0
    ]


def summarize(
    times: list[tuple[str, float]], wall_s: float, matmul_flops: float, attention_flops: float, top: int = 8
) -> dict[str, Any]:
    """One profiled call's kernels -> count, summed ms, share of the wall time, ms and share per
    class, the matmuls' and attention's TFLOP/s over their own kernels' time, the longest kernels."""
    total_us = sum(us for _, us in times)
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, us in times:
        by_class[classify(name)] += us
        by_name[name][0] += 1
        by_name[name][1] += us
    out: dict[str, Any] = {
        "wall_ms": round(wall_s * 1e3, 3),
        "kernels": len(times),
        "kernel_ms": round(total_us / 1e3, 3),
        "busy": round(total_us / 1e6 / wall_s, 3) if wall_s > 0 else None,
    }
    for c in CLASS_NAMES:
        out[f"{c}_ms"] = round(by_class[c] / 1e3, 3)
        out[f"{c}_pct"] = round(100 * by_class[c] / total_us, 1) if total_us else None
    for c, flops in (("matmul", matmul_flops), ("attention", attention_flops)):
        out[f"{c}_tflops"] = round(flops / (by_class[c] * 1e-6) / 1e12, 2) if by_class[c] else None
    longest = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    out["top"] = [
        {"name": n[:100], "class": classify(n), "count": int(c), "ms": round(us / 1e3, 3),
         "pct": round(100 * us / total_us, 1)}
        for n, (c, us) in longest
    ]  # fmt: skip
    return out


def profile_call(fn: Any, device: torch.device) -> tuple[Any, float]:
    """fn() once under the profiler, the device synchronized inside it -> (the profile, the
    call's wall seconds, which the profiler's own overhead lengthens: on the CPU, per op)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return prof, wall


def profile_preset(
    preset: str,
    dtype: torch.dtype,
    batches: list[int],
    device: torch.device,
    steps: int = 2,
    deadline: float = float("inf"),
) -> dict[str, Any]:
    """Per (batch, eager | graph): `summarize` of one `steps`-step batch of the preset with the
    Triton kernels and weights cast to `dtype`, as the runner serves it, against the median wall
    time of unprofiled calls. Stops at `deadline`."""
    from server import cuda_graphs

    cfg = PRESETS[preset]
    model = TrigFlow(random_dit(preset).to(device), SIGMA_D).cast_network(dtype)
    attn = cfg.attention_flops_per_image()
    res: dict[str, Any] = {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "steps": steps}
    res["rows"] = []
    kernels.use_reference(False)
    for b in batches:
        fn, _ = sampler_fn(model, cfg, b, steps, dtype, "cast", device)
        modes: list[tuple[str, Any]] = [("eager", fn)]
        if device.type == "cuda":
            modes.append(("graph", cuda_graphs.capture(fn, cuda_graphs.new_pool()).replay))
        for mode, call in modes:
            if time.monotonic() > deadline:
                res["truncated"] = True
                return res
            row: dict[str, Any] = {"batch": b, "mode": mode}
            try:
                wall = wall_median(call, device, 0.2)  # warms up (compiles) first
                prof, profiled_wall = profile_call(call, device)
                matmul, attention = steps * b * (cfg.flops_per_image() - attn), steps * b * attn
                row.update(
                    summarize(kernel_times(prof, device), wall, matmul, attention),
                    profiled_wall_ms=round(profiled_wall * 1e3, 3),
                )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            res["rows"].append(row)
            print({k: v for k, v in row.items() if k != "top"}, flush=True)
    return res
