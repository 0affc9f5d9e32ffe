"""Kernel tests really run the Triton kernels (through the interpreter on the CPU) and say how
many did: every launch is counted, and the summary prints the count."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import kernels

LAUNCHES: Counter[str] = Counter()
TESTS_WITH_LAUNCHES: set[str] = set()


def _wrap_run(cls: Any) -> None:
    orig = cls.run
    if getattr(orig, "_counted", False):
        return

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        LAUNCHES[getattr(self, "__name__", None) or getattr(self.fn, "__name__", "?")] += 1
        return orig(self, *args, **kwargs)

    run._counted = True  # type: ignore[attr-defined]
    cls.run = run


@pytest.fixture(scope="session", autouse=True)
def _count_launches() -> None:
    import triton  # a missing triton fails the kernel tests; it never skips them

    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction

        _wrap_run(InterpretedFunction)
    else:
        _wrap_run(triton.runtime.jit.JITFunction)


@pytest.fixture(autouse=True)
def _force_triton(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every kernel test runs the Triton path on its tensors (CPU included) and must launch."""
    kernels.force_triton(True)
    before = sum(LAUNCHES.values())
    yield
    kernels.force_triton(False)
    if sum(LAUNCHES.values()) > before:
        TESTS_WITH_LAUNCHES.add(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not LAUNCHES:
        return
    mode = "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "native"
    terminalreporter.write_sep("=", "Triton kernels executed")
    terminalreporter.write_line(
        f"mode: {mode}; tests that launched Triton kernels: {len(TESTS_WITH_LAUNCHES)}"
    )
    for name, n in sorted(LAUNCHES.items()):
        terminalreporter.write_line(f"  {name}: {n} launches")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_to_fp32(
    kernel_out: torch.Tensor, torch_lowp: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype
) -> None:
    """flash-attention's bound: kernel error <= 2 x torch's own error in that dtype + atol,
    both measured against the fp32 reference."""
    err_k = (kernel_out.float() - ref32).abs().max().item()
    err_t = (torch_lowp.float() - ref32).abs().max().item()
    assert err_k <= 2 * err_t + ATOL[dtype], f"{dtype}: kernel err {err_k:.3g} vs torch err {err_t:.3g}"
