"""A model preset's sampler on the device: latency and TFLOP/s per batch, eager vs captured,
the Triton kernels vs the torch reference ops, weights cast once vs autocast, and the roofline.

The sampled function is the runner's: 2-step consistency sampling from static buffers into an
output buffer. Weights are random (`random_dit`): speed needs no training.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

import kernels
from bench.roofline import wall_median
from models.config import PRESETS, DiTConfig
from models.consistency import DEFAULT_SCHEDULES, SIGMA_D, TrigFlow
from models.placeholder import random_dit
from models.sampler import consistency_sample


def sampler_fn(
    model: TrigFlow,
    a: DiTConfig,
    batch: int,
    steps: int,
    dtype: torch.dtype,
    mode: str,
    device: torch.device,
    seed: int = 0,
) -> tuple[Callable[[], None], torch.Tensor]:
    """A zero-argument sampler over static buffers -> (fn, out [batch, C, H, W] fp32).

    mode 'cast': the network's weights are already in `dtype` (`TrigFlow.cast_network`, as the
    runner does at load). mode 'autocast': fp32 weights
    under torch.autocast without its weight cache (what a captured graph can hold), so every
    forward re-casts every weight.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((steps, batch, a.channels, a.image_size, a.image_size), device=device, generator=g)
    labels = torch.randint(0, a.num_classes, (batch,), device=device, generator=g)
    times = torch.tensor(DEFAULT_SCHEDULES[steps], dtype=torch.float32, device=device)
    out = torch.empty((batch, a.channels, a.image_size, a.image_size), device=device)

    autocast = mode == "autocast" and dtype != torch.float32

    @torch.inference_mode()
    def fn() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast, cache_enabled=False):
            out.copy_(consistency_sample(model, noise, labels, times))

    return fn, out


def graph_launch_s(device: torch.device) -> float:
    """Wall time of replaying a graph of one tiny kernel, synchronized: the fixed cost every
    captured batch pays."""
    from server import cuda_graphs

    x = torch.zeros(1, device=device)

    def tiny() -> None:
        x.add_(1)

    g = cuda_graphs.capture(tiny, cuda_graphs.new_pool())
    return wall_median(g.replay, device, 0.3)


def bench_preset(
    preset: str, dtype: torch.dtype, batches: list[int], device: torch.device, peak_tflops: float,
    copy_tbps: float, steps: int = 2, modes: tuple[str, ...] = ("cast",),
    kernel_sets: tuple[str, ...] = ("triton", "reference"), budget_s: float = 0.3,
    deadline: float = float("inf"),
) -> dict[str, Any]:  # fmt: skip
    """Per (mode, kernels, batch): eager and graph latency of a `steps`-step batch, images/s and
    TFLOP/s; graph output checked against eager reference ops. Stops adding rows at `deadline`."""
    from server import cuda_graphs

    cfg = PRESETS[preset]
    net = random_dit(preset).to(device)
    params = sum(p.numel() for p in net.parameters())
    flops = cfg.flops_per_image()
    cuda = device.type == "cuda"
    launch = graph_launch_s(device) if cuda else 0.0
    res: dict[str, Any] = {
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "params": params,
        "gflops_per_image_forward": round(flops / 1e9, 3),
        "peak_tflops": round(peak_tflops, 3),
        "graph_launch_us": round(launch * 1e6, 1),
        "rows": [],
    }
    models = {}
    if "autocast" in modes:
        models["autocast"] = TrigFlow(net, SIGMA_D)
        net = copy.deepcopy(net)
    models["cast"] = TrigFlow(net, SIGMA_D).cast_network(dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    # the bound of one batch: its FLOPs at the peak, or reading every weight once per step at the
    # copy bandwidth (batch 1 of a 100M-parameter model is weight-bound), plus one graph launch
    weight_s = params * elem / (copy_tbps * 1e12)  # copy_tbps counts read + write traffic
    for mode in modes:
        for kset in kernel_sets:
            kernels.use_reference(kset == "reference")
            try:
                for b in batches:
                    if time.monotonic() > deadline:
                        res["truncated"] = True
                        return res
                    row: dict[str, Any] = {"mode": mode, "kernels": kset, "batch": b}
                    try:
                        fn, out = sampler_fn(models[mode], cfg, b, steps, dtype, mode, device)
                        t0 = time.perf_counter()
                        graph = cuda_graphs.capture(fn, cuda_graphs.new_pool()) if cuda else None
                        row["capture_s"] = round(time.perf_counter() - t0, 3)
                        eager_s = wall_median(fn, device, budget_s)
                        # no graphs off CUDA: the "graph" figures are the eager ones there
                        graph_s = wall_median(graph.replay if graph else fn, device, budget_s)
                        bound = steps * max(b * flops / (peak_tflops * 1e12), weight_s) + launch
                        row.update(
                            eager_ms=round(eager_s * 1e3, 3),
                            graph_ms=round(graph_s * 1e3, 3),
                            graph_speedup=round(eager_s / graph_s, 2),
                            images_per_s=round(b / graph_s, 1),
                            tflops=round(steps * b * flops / graph_s / 1e12, 2),
                            pct_peak=round(100 * steps * b * flops / graph_s / 1e12 / peak_tflops, 1),
                            bound_ms=round(bound * 1e3, 3),
                            x_bound=round(graph_s / bound, 2),
                        )
                        if kset == "triton":
                            # the captured Triton graph against eager torch reference ops
                            (graph.replay if graph else fn)()
                            got = out.clone()
                            kernels.use_reference(True)
                            fn()
                            kernels.use_reference(False)
                            row["graph_vs_reference_rel_err"] = float((got - out).norm() / out.norm())
                        del graph
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                    res["rows"].append(row)
                    print(row, flush=True)
            finally:
                kernels.use_reference(False)
    return res
