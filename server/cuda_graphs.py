"""The only CUDA-specific lines of the runner: capture a zero-argument function into a graph.

Kept apart so the CPU path (tests, CI) exercises everything else of the runner unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def new_pool() -> Any:
    """One memory pool shared by every captured graph (captured largest bucket first, so the
    smaller graphs fit in the memory the largest one already reserved)."""
    return torch.cuda.graph_pool_handle()


def capture(fn: Callable[[], None], pool: Any, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Run `fn` eagerly on a side stream (lazy inits, Triton JIT, autotuning), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    torch.cuda.synchronize()
    return graph


def reserved_bytes(device: torch.device) -> int:
    return int(torch.cuda.memory_reserved(device))
