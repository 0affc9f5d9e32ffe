"""GPU-only checks (marker `cuda`; skipped without CUDA; run by `make gpu-check`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.conftest import DTYPES, assert_close_to_fp32

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_kernels_match_references(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dev = "cuda"
    x, h = torch.randn(4, 49, 1023, device=dev), torch.randn(4, 49, 1023, device=dev)
    g, sh, sc = torch.randn(4, 3 * 1023, device=dev).chunk(3, dim=-1)
    lp = [t.to(dtype) for t in (x, sh, sc)]
    assert_close_to_fp32(
        kernels.adaln_norm(*lp), reference.adaln_norm(*lp), reference.adaln_norm(x, sh, sc), dtype
    )
    lp = [t.to(dtype) for t in (x, g, h, sh, sc)]
    kx, ky = kernels.residual_adaln_norm(*lp)
    tx, ty = reference.residual_adaln_norm(*lp)
    rx, ry = reference.residual_adaln_norm(x, g, h, sh, sc)
    assert_close_to_fp32(kx, tx, rx, dtype)
    assert_close_to_fp32(ky, ty, ry, dtype)
    for B, H, N, Dh in [(2, 6, 49, 32), (1, 4, 257, 64), (1, 2, 77, 24), (1, 2, 130, 128)]:
        qkv = torch.randn(B, N, 3, H, Dh, device=dev).permute(2, 0, 3, 1, 4)
        w = torch.rand(Dh, device=dev) + 0.5
        lp = [t.to(dtype) for t in (qkv[0], qkv[1], qkv[2], w, w)]
        assert_close_to_fp32(
            kernels.attention(*lp),
            reference.attention(*lp),
            reference.attention(qkv[0], qkv[1], qkv[2], w, w),
            dtype,
        )


def _engine(ckpt: Path, backend: str):  # type: ignore[no-untyped-def]
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    e = Engine(Settings(checkpoint=str(ckpt), device="cuda", backend=backend, buckets=[1, 4, 16]), Metrics())
    e.warmup()
    return e


def test_graph_replay_equals_eager(tiny_ckpt: Path) -> None:
    kernels.force_triton(False)
    graph, eager = _engine(tiny_ckpt, "graph"), _engine(tiny_ckpt, "eager")
    for n in (1, 3, 16, 21):
        labels, seeds = [i % 10 for i in range(n)], list(range(100, 100 + n))
        a, b = graph.sample(2, labels, seeds), eager.sample(2, labels, seeds)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert graph.metrics.runner_runs.labels("graph")._value.get() > 0
    assert graph.metrics.runner_runs.labels("eager")._value.get() == 0


def test_replay_does_not_allocate(tiny_ckpt: Path) -> None:
    kernels.force_triton(False)
    e = _engine(tiny_ckpt, "graph")
    slot = e.runner.slots[(16, 2)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(5):
        slot.graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
