"""kernels.bench's rows, built on the CPU (the Triton interpreter) with a stand-in timer: the
GPU run is the only place it is timed, so a broken row must show up here first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernels import bench


def test_attention_row_times_every_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def once(fn: Callable[[], Any], *a: Any) -> float:
        calls.append(fn())  # each variant runs for real once
        return 2.0

    monkeypatch.setattr(bench, "_bench", once)
    row = bench.bench_attention("cpu", torch.float32, 1, 2, 64, 32)
    variants = ("triton", "triton_scores", "triton_m32", "triton_m16", "torch", "sdpa_no_norm")
    assert len(calls) == len(variants) and all(c.shape == (1, 2, 64, 32) for c in calls)
    # the four Triton variants and the reference compute the same attention
    for triton_out in calls[:4]:
        torch.testing.assert_close(triton_out, calls[4], atol=1e-4, rtol=0)
    for key in variants:
        assert row[f"{key}_ms"] == 2.0
        assert row[f"{key}_tflops"] == pytest.approx(4 * 2 * 64 * 64 * 32 / 2.0 / 1e9)


def test_a_failing_variant_is_recorded_and_the_others_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def once(fn: Callable[[], Any], *a: Any) -> float:
        fn()
        return 2.0

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(bench, "_bench", once)
    monkeypatch.setattr(bench.reference, "attention", broken)
    row = bench.bench_attention("cpu", torch.float32, 1, 1, 16, 16)
    assert row["torch_error"] == "RuntimeError: no kernel for this shape" and "torch_ms" not in row
    others = ("triton", "triton_scores", "triton_m32", "triton_m16", "sdpa_no_norm")
    assert [row[f"{key}_ms"] for key in others] == [2.0] * len(others)


def test_quantize_sweep_times_every_choice_and_each_computes_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every (rows per program, warps) choice runs for real once and gives the reference's
    bytes (with the GELU where the shape asks for it); each row's GB/s is of its bytes moved.
    The report shows the rows."""
    from bench.gpu_report import markdown

    calls: list[Any] = []

    def once(fn: Callable[[], Any], *a: Any) -> float:
        calls.append(fn())
        return 2e-6

    monkeypatch.setattr(bench, "_bench", once)
    monkeypatch.setattr(bench, "QUANT_SHAPES", [(8, 200, False), (8, 100, True)])
    rows = bench.sweep_quantize("cpu")
    assert [r["config"] for r in rows[:3]] == ["torch", "default", [4, 4]]
    assert {r["K"] for r in rows} == {200, 100} and not any("error" in r for r in rows)
    assert rows[0]["gbps"] == pytest.approx((8 * 200 * 3 + 32) / 2e-6 / 1e6, rel=1e-3)
    for (q, s), r in zip(calls, rows, strict=True):
        ref_q, ref_s = calls[0 if r["K"] == 200 else next(i for i, x in enumerate(rows) if x["K"] == 100)]
        if r["gelu"]:  # the GELU's last bits differ between the kernel and torch (its own test)
            assert (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean() < 0.02
        else:
            assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    md = markdown({"device": "cpu", "parts": {"qsweep": {"rc": 0, "result": {"sweep": rows}}}})
    assert "| R | K | gelu | config | ms | gbps | error |" in md and "| 8 | 100 | True | [8, 4] |" in md
