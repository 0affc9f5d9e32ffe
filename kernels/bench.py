"""Kernel benchmarks (not tests): each Triton op against its torch reference, on a GPU.

    python -m kernels.bench --json out.json

Norms are reported in GB/s (bytes read + written once), attention in TFLOP/s (4·B·H·N²·Dh),
timed with `triton.testing.do_bench` (warm-up, then the median of many runs, synced).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any

import torch

from kernels import reference


def _bench(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep))  # ms


def bench_norm(device: str, dtype: torch.dtype, rows: int, D: int) -> dict[str, Any]:
    from kernels.adaln_norm_kernel import adaln_norm, residual_adaln_norm

    B, N = max(rows // 49, 1), 49
    x, h = torch.randn(B, N, D, device=device, dtype=dtype), torch.randn(B, N, D, device=device, dtype=dtype)
    mods = torch.randn(B, 3 * D, device=device, dtype=dtype).chunk(3, dim=-1)
    el = x.element_size()
    out: dict[str, Any] = {"op": "adaln_norm", "dtype": str(dtype), "B": B, "N": N, "D": D}
    nbytes = 2 * x.numel() * el
    out["triton_ms"] = _bench(lambda: adaln_norm(x, mods[1], mods[2]))
    out["torch_ms"] = _bench(lambda: reference.adaln_norm(x, mods[1], mods[2]))
    out["triton_gbps"], out["torch_gbps"] = nbytes / out["triton_ms"] / 1e6, nbytes / out["torch_ms"] / 1e6
    rb = 4 * x.numel() * el  # x, h in; x', y out
    out["residual_triton_ms"] = _bench(lambda: residual_adaln_norm(x, mods[0], h, mods[1], mods[2]))
    out["residual_torch_ms"] = _bench(lambda: reference.residual_adaln_norm(x, mods[0], h, mods[1], mods[2]))
    out["residual_triton_gbps"] = rb / out["residual_triton_ms"] / 1e6
    return out


def bench_attention(device: str, dtype: torch.dtype, B: int, H: int, N: int, Dh: int) -> dict[str, Any]:
    from kernels.attention_kernel import attention

    q, k, v = (torch.randn(B, H, N, Dh, device=device, dtype=dtype) for _ in range(3))
    w = torch.ones(Dh, device=device, dtype=dtype)
    flops = 4 * B * H * N * N * Dh
    out: dict[str, Any] = {"op": "attention", "dtype": str(dtype), "B": B, "H": H, "N": N, "Dh": Dh}
    variants: dict[str, Callable[[], Any]] = {
        "triton": lambda: attention(q, k, v, w, w),
        "triton_scores": lambda: attention(q, k, v, w, w, k_norm="scores"),
        # fewer queries per program: more programs where B·H·N/64 leaves SMs idle (batch 1)
        "triton_m32": lambda: attention(q, k, v, w, w, config=(32, 64, 4, 3)),
        "triton_m16": lambda: attention(q, k, v, w, w, config=(16, 64, 4, 3)),
        "torch": lambda: reference.attention(q, k, v, w, w),
        # torch's own fused attention alone, QK-norm left out: what the dots and softmax cost there
        "sdpa_no_norm": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    for key, fn in variants.items():
        try:
            out[f"{key}_ms"] = _bench(fn)
            out[f"{key}_tflops"] = flops / out[f"{key}_ms"] / 1e9
        except Exception as e:  # one variant that fails to compile must not lose the others
            out[f"{key}_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


# (B, H, N, Dh) of the models' attention: MNIST DiT at batch 64, DiT-B/2 at 128 and 1, DiT-XL/2
# at 32
SWEEP_SHAPES = [(128, 12, 256, 64), (1, 12, 256, 64), (32, 16, 256, 72), (64, 6, 49, 32)]


def sweep_attention(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, deadline: float = float("inf")
) -> list[dict[str, Any]]:
    """Time the attention kernel over (BLOCK_M, BLOCK_N, num_warps, num_stages) per model shape,
    beside the default choice and torch; stops at `deadline` (time.monotonic)."""
    import time

    from kernels.attention_kernel import attention

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows: list[dict[str, Any]] = []
    for B, H, N, Dh in SWEEP_SHAPES:
        q, k, v = (torch.randn(B, H, N, Dh, device=device, dtype=dtype) for _ in range(3))
        w = torch.rand(Dh, device=device, dtype=dtype) + 0.5
        flops = 4 * B * H * N * N * Dh
        ms: tuple[int, ...] = (32, 64) if N <= 64 else (64, 128)
        ns, wps = ((32, 64), (4,)) if N <= 64 else ((32, 64, 128), (4, 8))
        blocks_64 = B * H * ((N + 63) // 64)
        if blocks_64 < sms:  # fewer 64-query blocks than the GPU has SMs: smaller blocks too
            ms = (16, 32, *ms)
        configs: list[tuple[int, int, int, int] | None] = [None]
        configs += [(m, n, wp, st) for m in ms for n in ns for wp in wps for st in (2, 3)]
        base = {"dtype": str(dtype), "B": B, "H": H, "N": N, "Dh": Dh}
        ref = functools.partial(reference.attention, q, k, v, w, w)
        rows.append({**base, "config": "torch", "ms": _bench(ref)})
        for cfg in configs:
            if time.monotonic() > deadline:
                return rows
            row: dict[str, Any] = {**base, "config": "default" if cfg is None else list(cfg)}
            try:
                row["ms"] = _bench(functools.partial(attention, q, k, v, w, w, config=cfg), 5, 25)
                row["tflops"] = round(flops / row["ms"] / 1e9, 1)
            except Exception as e:  # out of shared memory or registers: record, go on
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    return rows


# (rows, K, gelu) of the float8 linears' inputs: DiT-B/2 at batch 256 (qkv/proj/fc1, then fc2's
# with the GELU), DiT-XL/2 at batch 64
QUANT_SHAPES = [(65536, 768, False), (65536, 3072, True), (16384, 1152, False), (16384, 4608, True)]


def sweep_quantize(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, deadline: float = float("inf")
) -> list[dict[str, Any]]:
    """Time the float8 quantization kernel over (rows per program, warps) per shape, beside the
    default choice and torch's passes, in GB/s (x read, q and the scales written once); stops at
    `deadline` (time.monotonic)."""
    import time

    import triton

    from kernels.fp8_quant_kernel import quantize_rows_fp8

    rows: list[dict[str, Any]] = []
    for R, K, gelu in QUANT_SHAPES:
        x = torch.randn(R, K, device=device, dtype=dtype)
        nbytes = R * K * (x.element_size() + 1) + 4 * R
        base = {"dtype": str(dtype), "R": R, "K": K, "gelu": gelu}
        block_k = triton.next_power_of_2(K)
        configs: list[tuple[int, int] | None] = [None]
        configs += [(r, w) for r in (1, 2, 4, 8, 16) for w in (4, 8) if 1024 <= r * block_k <= 16384]
        fns: list[tuple[Any, Callable[[], Any]]] = [
            ("torch", functools.partial(reference.quantize_rows_fp8, x, gelu))
        ]
        fns += [(c, functools.partial(quantize_rows_fp8, x, gelu, c)) for c in configs]
        for cfg, fn in fns:
            if time.monotonic() > deadline:
                return rows
            label = "default" if cfg is None else list(cfg) if isinstance(cfg, tuple) else cfg
            row: dict[str, Any] = {**base, "config": label}
            try:
                row["ms"] = _bench(fn, 5, 25)
                row["gbps"] = round(nbytes / row["ms"] / 1e6, 1)
            except Exception as e:  # out of registers: record, go on
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    return rows


def run(device: str = "cuda", quick: bool = False) -> list[dict[str, Any]]:
    dtypes = [torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    rows = []
    for dt in dtypes:
        for r, D in [(64 * 49, 192)] if quick else [(64 * 49, 192), (256 * 49, 1152), (4096, 4096)]:
            rows.append(bench_norm(device, dt, r, D))
        shapes = [(64, 6, 49, 32), (16, 16, 256, 72), (4, 16, 1024, 64)]
        if dt != torch.float32:
            shapes += [(256, 12, 256, 64), (1, 12, 256, 64)]  # DiT-B/2's largest bucket, and batch 1
        for B, H, N, Dh in [(64, 6, 49, 32)] if quick else shapes:
            rows.append(bench_attention(device, dt, B, H, N, Dh))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU (the CPU interpreter is for correctness, not speed)")
    rows = run("cuda", args.quick)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
