"""Ceilings to hold measured speed against: datasheet peaks by device, and measured ones.

Datasheet figures are dense (no 2:4 sparsity) tensor-core TFLOP/s and memory TB/s from NVIDIA's
data sheets; 'fp32' is the tensor cores' TF32 rate for matrix work. A device not in the table, and
every CPU, is held against what `measure_peaks` finds on it.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

# name fragment (matched in order, case-insensitive) -> dense TFLOP/s per dtype, and TB/s
DATASHEET: list[tuple[str, dict[str, float], float]] = [
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float8": 1978.9}, 4.8),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float8": 1513.0}, 2.0),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float8": 1978.9}, 3.35),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0}, 2.0),
    ("L40S", {"bfloat16": 362.1, "float16": 362.1, "tf32": 183.0, "float8": 733.0}, 0.864),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float8": 242.5}, 0.3),
]


def datasheet(device_name: str) -> dict[str, Any] | None:
    for frag, tflops, tbps in DATASHEET:
        if frag.lower() in device_name.lower():
            return {"match": frag, "tflops": tflops, "tbps": tbps}
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_median(fn: Any, device: torch.device, budget_s: float = 0.5, min_reps: int = 5) -> float:
    """Median wall-clock seconds of fn() with the device synchronized around each call (what a
    caller waiting for the result sees), after one warm call; as many reps as fit budget_s."""
    fn()
    _sync(device)
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_peaks(device: torch.device, size: int = 0) -> dict[str, float]:
    """Measured ceilings: a large matmul's TFLOP/s per dtype, and a device-to-device copy's
    TB/s (bytes read + written). CPU: fp32 only, smaller sizes."""
    out: dict[str, float] = {}
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 1024)
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if cuda else [torch.float32]
    for dt in dtypes:
        a, b = (torch.randn(n, n, device=device).to(dt) for _ in range(2))
        if dt == torch.float32 and cuda:
            # fp32 matmul as torch runs it by default (no TF32), then with TF32
            for name, tf32 in (("float32", False), ("tf32", True)):
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    sec = wall_median(functools.partial(torch.matmul, a, b), device, 0.5)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
                out[name] = 2 * n**3 / sec / 1e12
            continue
        sec = wall_median(functools.partial(torch.matmul, a, b), device, 0.5)
        out[str(dt).removeprefix("torch.")] = 2 * n**3 / sec / 1e12
    nbytes = (1 << 30) if cuda else (1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    sec = wall_median(lambda: dst.copy_(src), device, 0.5)
    out["copy_tbps"] = 2 * nbytes / sec / 1e12
    return out
