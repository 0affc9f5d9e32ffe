"""Every Triton kernel, as its wrapper launches it at the models' shapes, compiles for a Hopper GPU
(sm_90) with Triton's compiler and ptxas, here without a GPU (tests/kernels/sm90_compile.py).
The interpreter that runs the other kernel tests accepts code a GPU compiler refuses: a kernel
that read a module-level float passed them and failed to compile on an H200."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_the_simple_ones_do_not_spill(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = json.loads(out.read_text())
    failed = [(r["case"], r["error"]) for r in rows if "error" in r]
    assert p.returncode == 0 and not failed, (failed, p.stderr[-2000:])
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_adaln_norm_kernel", "_gated_residual_kernel", "_attention_kernel",
                       "_quantize_rows_fp8_kernel"}  # fmt: skip
    # the GPU's paths, not the interpreter's: bf16 dots, the hardware's float8 casts
    attn = [r for r in rows if r["kernel"] == "_attention_kernel" and "bfloat16" in r["case"]]
    assert attn and all(r["constexprs"]["DOT_DTYPE"] == "bf16" for r in attn)
    quant = [r for r in rows if "HW_CAST" in r["constexprs"]]
    assert {r["kernel"] for r in quant} == {"_quantize_rows_fp8_kernel", "_adaln_norm_kernel"}
    assert all(r["constexprs"]["HW_CAST"] == "True" for r in quant)
    assert any(r["constexprs"].get("QUANT") == "True" for r in rows)  # the norms' float8 form
    # row kernels hold a few values per thread: a spill means a block choice went wrong
    for r in rows:
        if r["kernel"] != "_attention_kernel":
            assert r["spill_bytes"] == 0, r
        assert r["registers"] <= 255
