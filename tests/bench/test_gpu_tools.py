"""What of the GPU tooling runs without a GPU: the presets' FLOPs, the roofline ceilings, the
gpu-check harness (its refusal, its parts and report, its kill on timeout) and the wheel set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import gpu_check, gpu_wheels
from bench.gpu_profile import CLASS_NAMES, classify, summarize
from bench.roofline import datasheet, measure_peaks
from models.config import PRESETS
from models.consistency import SIGMA_D, TrigFlow
from models.placeholder import random_dit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tiny", "mnist-s"])
def test_flops_formula_matches_counted_flops(preset: str) -> None:
    """The config's FLOPs per image against torch's own count of the matmuls, convolutions and
    attention of one forward pass (norms and elementwise ops, which the formula leaves out, are
    not counted by torch either)."""
    cfg = PRESETS[preset]
    net = random_dit(preset).eval()
    B = 3
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size)
    # the math backend runs attention as matmuls, which the counter sees (the CPU's fused
    # attention op is not in its table)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(x, torch.rand(B), torch.randint(0, cfg.num_classes, (B,)))
    counted = counter.get_total_flops() / B
    assert abs(counted - cfg.flops_per_image()) / counted < 0.01, (counted, cfg.flops_per_image())
    # attention's share (the profile's attention TFLOP/s): its batched products, exactly
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] / B == cfg.attention_flops_per_image()


def test_gpu_presets_match_the_dit_paper() -> None:
    # Peebles & Xie 2023, Table 1: DiT-B/2 23.01 and DiT-XL/2 118.64 G multiply-adds at 256x256
    assert PRESETS["dit-b2"].flops_per_image() / 2e9 == pytest.approx(23.01, rel=0.01)
    assert PRESETS["dit-xl2"].flops_per_image() / 2e9 == pytest.approx(118.64, rel=0.01)
    assert PRESETS["dit-b2"].num_tokens == 256 and PRESETS["dit-xl2"].head_dim == 72
    net = TrigFlow(random_dit("dit-b2"), SIGMA_D)
    params = sum(p.numel() for p in net.parameters())
    assert 125e6 < params < 136e6  # the paper's 130 M, plus the class table of 1,001 rows


def test_datasheet_lookup_and_cpu_peaks() -> None:
    assert datasheet("NVIDIA H100 80GB HBM3")["tflops"]["bfloat16"] == pytest.approx(989.4)
    assert datasheet("NVIDIA H100 PCIe")["match"] == "H100 PCIe"
    assert datasheet("NVIDIA H200")["tbps"] == pytest.approx(4.8)
    assert datasheet("Some CPU") is None
    peaks = measure_peaks(torch.device("cpu"), size=256)
    assert peaks["float32"] > 0 and peaks["copy_tbps"] > 0


def test_gpu_check_refuses_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1
    assert "no CUDA device" in p.stderr
    assert not list(tmp_path.iterdir())  # no report that could pass for a GPU run


def test_gpu_check_harness_on_cpu(tmp_path: Path) -> None:
    """--allow-cpu runs the parts that can run here and writes the report with the roofline
    columns against the CPU's measured peak."""
    p = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--allow-cpu", "--parts", "env,model,profile",
         "--budget", "200", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=260,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    env = report["parts"]["env"]["result"]
    assert env["measured"]["float32"] > 0 and env["datasheet"] is None
    (model,) = report["parts"]["model"]["result"]
    assert model["preset"] == "mnist-s" and model["peak_tflops"] == pytest.approx(
        env["measured"]["float32"], abs=0.006
    )
    rows = model["rows"]
    assert {r["batch"] for r in rows} == {1, 8} and all("error" not in r for r in rows)
    # tflops is rounded to 0.01: a loaded CI machine can round it to 0
    assert all(r["tflops"] >= 0 and r["graph_ms"] > 0 and r["x_bound"] >= 1 for r in rows), rows
    (prof,) = report["parts"]["profile"]["result"]
    assert [(r["batch"], r["mode"]) for r in prof["rows"]] == [(1, "eager"), (4, "eager")]
    for r in prof["rows"]:
        assert "error" not in r, r
        # every op lands in one class, and the ops ran inside the call the wall time covers
        parts = sum(r[f"{c}_ms"] for c in CLASS_NAMES)
        assert parts == pytest.approx(r["kernel_ms"], abs=0.01) and r["busy"] > 0, r
        assert r["kernel_ms"] <= r["profiled_wall_ms"], r
        assert r["matmul_ms"] > 0 and r["matmul_tflops"] > 0 and r["top"][0]["class"] == "matmul", r
    md = next(tmp_path.glob("*.md")).read_text()
    assert "## model" in md and "pct_peak" in md and "## profile" in md and "matmul_tflops" in md


def test_profile_classes_and_summary() -> None:
    """Kernel names as cuBLAS, Triton and aten give them land in their classes, and the summary's
    sums, shares and TFLOP/s follow from the times."""
    names = {
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmul",
        "_attention_kernel": "attention",
        "_adaln_norm_kernel": "norm",
        "_gated_residual_kernel": "norm",
        "_quantize_rows_fp8_kernel": "quantize",
        "Memcpy DtoD (Device -> Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other",
        "aten::addmm": "matmul",
        "aten::_scaled_mm": "matmul",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    }
    assert {n: classify(n) for n in names} == names
    times = [("nvjet_a", 600.0), ("nvjet_a", 200.0), ("_attention_kernel", 100.0), ("misc", 100.0)]
    s = summarize(times, wall_s=2e-3, matmul_flops=8e9, attention_flops=1e8, top=2)
    assert (s["kernels"], s["kernel_ms"], s["busy"]) == (4, 1.0, 0.5)
    assert (s["matmul_pct"], s["attention_pct"], s["other_pct"], s["norm_ms"]) == (80.0, 10.0, 10.0, 0.0)
    assert s["matmul_tflops"] == 10.0 and s["attention_tflops"] == 1.0  # 8e9 / 0.8 ms; 1e8 / 0.1 ms
    top = [(t["name"], t["count"], t["ms"]) for t in s["top"]]
    assert top == [("nvjet_a", 2, 0.8), ("_attention_kernel", 1, 0.1)]


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    # gone, or a zombie waiting for init to reap it: either way no longer running
    return status.exists() and "State:\tZ" not in status.read_text()


@pytest.mark.parametrize("part_sleeps", [60, 0], ids=["past-its-limit", "exits-leaving-a-server"])
def test_part_is_killed_with_everything_it_started(tmp_path: Path, part_sleeps: int) -> None:
    """A child in the part's process group, and one in a session of its own (as the benches
    start their servers), are both gone once the part is: killed at its limit, or exited."""
    pidfile = tmp_path / "child.pid"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    script = (
        "import subprocess, sys, time\n"
        f"a = subprocess.Popen({sleeper!r})\n"
        f"b = subprocess.Popen({sleeper!r}, start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{a.pid}} {{b.pid}}')\n"
        f"time.sleep({part_sleeps})\n"
    )
    t0 = time.monotonic()
    rc, log = gpu_check._spawn([sys.executable, "-c", script], 3.0, dict(os.environ))
    assert time.monotonic() - t0 < 20
    in_group, own_session = map(int, pidfile.read_text().split())
    if part_sleeps:
        assert rc == 124 and "killed after 3 s" in log
    else:
        assert rc == 0 and f"left running: {sorted([in_group, own_session])}" in log
    time.sleep(0.2)
    assert not _running(in_group) and not _running(own_session)


def test_wheel_set_check_finds_a_missing_requirement(tmp_path: Path) -> None:
    have = sorted((ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    if not have:
        subprocess.run([sys.executable, "-m", "bench.gpu_wheels", "--dir", str(tmp_path / "all")], check=True,
                       timeout=300)  # fmt: skip
        have = sorted((tmp_path / "all").glob("*.whl"))
    assert gpu_wheels.missing(have[0].parent) == {}
    assert {gpu_wheels.wheel_name(w) for w in have} >= set(map(gpu_wheels.normalize, gpu_wheels.WHEELS))
    part = tmp_path / "part"
    part.mkdir()
    for w in have:
        if gpu_wheels.wheel_name(w) != "pydantic-core":
            shutil.copy(w, part)
    gaps = gpu_wheels.missing(part)
    assert any("pydantic-core" in lack for lack in gaps.values()), gaps


def test_every_bench_and_eval_flag_has_help() -> None:
    import argparse

    from bench.cli import add_args as bench_args
    from models.evaluate import add_args as eval_args

    missing = []
    for name, add in (("bench", bench_args), ("eval", eval_args)):
        p = argparse.ArgumentParser()
        add(p)
        parsers = [p]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                parsers += list(a.choices.values())
        for parser in parsers:
            for a in parser._actions:
                if a.option_strings and a.help is None and "--help" not in a.option_strings:
                    missing.append(f"{name} {parser.prog}: {a.option_strings}")
    assert not missing, missing


def test_host_breakdown_times_each_piece_of_a_served_batch(tiny_ckpt: Path) -> None:
    from bench.gpu_engine import build_engine, host_breakdown
    from bench.gpu_report import markdown
    from models.checkpoint import load_checkpoint

    name = load_checkpoint(tiny_ckpt)[1].info().name
    g = build_engine(tiny_ckpt, "eager", "auto", [1, 4], device="cpu", scorers=[f"{name}=mnist-lenet"])
    try:
        row = host_breakdown(g, 2, 4)
    finally:
        g.close()
    assert (row["steps"], row["batch"], row["pin_ms"]) == (2, 4, None)  # nothing to pin off the GPU
    assert all(
        row[k] > 0
        for k in (
            "noise_ms",
            "runner_ms",
            "served_ms",
            "score_ms",
            "noise_1_thread_ms",
            "served_1_thread_ms",
        )
    )
    assert row["torch_threads"] == torch.get_num_threads()  # restored after the one-thread timings
    report = {"device": "cpu", "parts": {"engine": {"rc": 0, "result": {"consistency": [
        {"dtype": "float32", "per_bucket": [], "vs_reference": [], "host_breakdown": [row]}]}}}}  # fmt: skip
    md = markdown(report)
    assert "| steps | batch | noise_ms | pin_ms | runner_ms | served_ms | score_ms | torch_threads |" in md
    assert "\n| 2 | 4 | " in md


def test_merge_takes_each_part_from_the_later_run_that_ran_it() -> None:
    from bench.gpu_report import markdown, merge

    first = {"device": "GPU X", "time": "t1", "command": "run one", "torch": "2.11", "parts": {
        "env": {"rc": 0, "result": {"device": "GPU X"}},
        "pytest": {"rc": 1, "log": "2 failed"},
        "quality": {"rc": None, "skipped": "out of time (5 s left)"},
    }}  # fmt: skip
    second = {"device": "GPU X", "time": "t2", "command": "run two", "torch": "2.11", "parts": {
        "env": {"rc": 0, "result": {"device": "GPU X", "again": True}},
        "quality": {"rc": 0, "result": [{"dtype": "bfloat16", "steps": 2, "fld": 30.1}]},
        "kbench": {"rc": None, "skipped": "out of time"},
    }}  # fmt: skip
    m = merge([first, second], notes=["pytest re-run by hand: 13 passed"])
    assert list(m["parts"]) == ["env", "pytest", "quality", "kbench"]
    assert m["parts"]["env"]["run"] == 2 and m["parts"]["env"]["result"]["again"]
    assert m["parts"]["pytest"] == {"rc": 1, "log": "2 failed", "run": 1}  # kept: run two did not run it
    assert m["parts"]["quality"]["run"] == 2 and m["parts"]["kbench"]["skipped"]
    assert [r["command"] for r in m["runs"]] == ["run one", "run two"]
    assert not m["ok"]  # pytest failed and kbench never ran
    md = markdown(m)
    assert "- run 1: t1, `run one`" in md and "- run 2: t2, `run two`" in md
    assert "- note: pytest re-run by hand: 13 passed" in md
    assert "## quality\nexit code 0, - s (run 2)" in md
    # a merged report merges again with its runs numbered on
    third = {"device": "GPU X", "time": "t3", "command": "run 3", "parts": {"pytest": {"rc": 0, "log": "ok"}}}
    mm = merge([m, third])
    assert mm["parts"]["pytest"]["run"] == 3 and mm["parts"]["quality"]["run"] == 2
    assert [r["time"] for r in mm["runs"]] == ["t1", "t2", "t3"]
    with pytest.raises(ValueError, match="different devices"):
        merge([first, {**second, "device": "GPU Y"}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_part_checks_both_k_norm_placements(dtype: torch.dtype) -> None:
    """gpu-check's kernels part runs attention with K's norm on the keys and on the scores (and
    fp32 with TF32 dots too), each against the float64 reference; here on the interpreter."""
    from bench.gpu_kernels import _attention_cases

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 49, 32).to(dtype) for _ in range(3))
    rows = _attention_cases(dtype, q, k, v, (torch.rand(32) + 0.5).to(dtype))
    notes = [r.get("note", "") for r in rows]
    assert notes == ["", "k_norm=scores", *(["fp32_precision=tf32"] if dtype == torch.float32 else [])]
    assert all(r["ok"] and "error" not in r for r in rows), rows


def test_kernel_part_checks_the_fp8_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu-check's kernels part holds the float8 row quantization to the reference's result
    (here on the interpreter, where it is bit-exact), and a kernel off by one e4m3 step fails."""
    from bench.gpu_kernels import _fp8_quant_case
    from kernels import triton_ops

    x = torch.randn(49, 192).to(torch.bfloat16)
    row = _fp8_quant_case(torch.bfloat16, x)
    assert row["ok"] and row["kernel_err"] == 0.0 and row["bound"] == 0.0, row
    gelu = _fp8_quant_case(torch.bfloat16, x, gelu=True)
    assert gelu["ok"] and gelu["note"] == "gelu", gelu
    real = triton_ops.quantize_rows_fp8

    def coarse(t: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        q, s = real(t, gelu)
        return (q.float() * 1.07).to(torch.float8_e4m3fn), s  # one step up, about

    monkeypatch.setattr(triton_ops, "quantize_rows_fp8", coarse)
    for g in (False, True):
        bad = _fp8_quant_case(torch.bfloat16, x, gelu=g)
        assert not bad["ok"] and "error" not in bad, bad


def test_repack_keeps_every_file_and_shrinks_large_wheels(tmp_path: Path) -> None:
    import zipfile

    text = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(3000)).encode()
    big, small = tmp_path / "big-1.0-py3-none-any.whl", tmp_path / "small-1.0-py3-none-any.whl"
    for path, n in ((big, 4), (small, 1)):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
            for i in range(n):
                z.writestr(f"pkg/m{i}.py", text)
            z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
    before = {p.name: p.stat().st_size for p in (big, small)}
    saved = gpu_wheels.repack(tmp_path, min_bytes=before["small-1.0-py3-none-any.whl"] + 1)
    assert saved == before[big.name] - big.stat().st_size > 0
    assert small.stat().st_size == before[small.name]  # under the threshold: untouched
    with zipfile.ZipFile(big) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
        assert z.read("pkg/m3.py") == text and z.read("pkg-1.0.dist-info/METADATA") == b"Name: pkg\n"
    size = big.stat().st_size
    assert gpu_wheels.repack(tmp_path, min_bytes=small.stat().st_size + 1) == 0  # already LZMA
    assert big.stat().st_size == size


def test_a_server_still_starting_is_stopped_by_stop_live(tmp_path: Path) -> None:
    """A bench ended by SIGTERM or an error while a server was still starting (in another
    thread, as the server bench starts them all at once) takes that server down too."""
    import threading

    from bench import procs

    errors: list[Exception] = []

    def start() -> None:
        try:
            procs.Proc([sys.executable, "-c", "import time; time.sleep(60)"], "/readyz", tmp_path / "log", 30)
        except Exception as e:  # the server died before it was ready
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    deadline = time.monotonic() + 10
    while not procs.LIVE and time.monotonic() < deadline:
        time.sleep(0.05)
    (proc,) = procs.LIVE
    procs.stop_live()
    t.join(10)
    assert not t.is_alive() and not procs.LIVE
    assert len(errors) == 1 and "exited" in str(errors[0])
    assert proc.proc.poll() is not None
