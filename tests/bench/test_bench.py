"""The benchmark harness keeps working: tiny --quick runs, with the keys the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.slow


def _bench(*args: str, tmp: Path) -> dict:
    out = tmp / "out.json"
    cmd = [sys.executable, "-m", "server.cli", "bench", *args, "--quick", "--json", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops the servers it started on SIGTERM
        log, _ = proc.communicate(timeout=60)
        raise AssertionError(f"bench --quick took over 240 s:\n{log.decode()[-3000:]}") from None
    assert proc.returncode == 0, log.decode()[-3000:]
    return json.loads(out.read_text())


def test_sampler_bench_quick(tmp_path: Path) -> None:
    r = _bench("sampler", tmp=tmp_path)
    batches = {row["batch"] for row in r["rows"]}
    assert batches == {1, 8, 64}
    assert all(row["images_per_s"] > 0 and row["ms_per_batch"] > 0 for row in r["rows"])


def test_sampler_bench_times_each_model_alike(tmp_path: Path) -> None:
    """The DiT and a diffusers UNet consistency model in one run, the same fields for each."""
    pytest.importorskip("diffusers")
    from tests.models.diffusers_fixtures import save_cm_dir

    cd = save_cm_dir(tmp_path / "cd", 3, {"schedules": {"1": [0], "2": [22, 0]}})
    tiny = ROOT / "models" / "weights" / "cm-mnist.json"
    r = _bench("sampler", "--model", f"mnist={tiny}", "--model", f"cd={cd}", tmp=tmp_path)
    by_model = {m: [row for row in r["rows"] if row["model"] == m] for m in ("mnist", "cd")}
    assert [row["family"] for row in by_model["cd"]] == ["edm"] * 3
    assert by_model["cd"][0]["image"] == "3x8x8" and by_model["mnist"][0]["image"] == "1x28x28"
    assert {tuple(sorted(row)) for row in r["rows"]} == {tuple(sorted(by_model["mnist"][0]))}
    assert all(row["images_per_s"] > 0 for row in r["rows"])


def test_server_bench_serves_a_diffusers_model(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from tests.models.diffusers_fixtures import save_cm_dir

    cd = save_cm_dir(tmp_path / "cd", None)  # unconditional: the bodies name no class
    r = _bench("server", "--model", str(cd), "--peers", "plain", tmp=tmp_path)
    for name, cfg in r["configs"].items():
        assert sum(row["statuses"].get("200", 0) for row in cfg["sweep"]) > 0, name
        assert all(row["errors"] == 0 for row in cfg["sweep"]), (name, cfg["sweep"])


def test_server_bench_quick(tmp_path: Path) -> None:
    # two client processes share each open-loop rate, and --fractions overrides quick's own
    r = _bench("server", "--plot", str(tmp_path / "plot.png"), "--clients", "2", "--fractions", "0.04,0.12",
               tmp=tmp_path)  # fmt: skip
    assert r["clients"] == 2 and r["fractions"] == [0.04, 0.12]
    for key in (
        "raw_images_per_s",
        "saturation_images_per_s",
        "efficiency",
        "idle_overhead_ms",
        "p99_over_p50_at_70pct",
        "max_rate_under_slo",
        "slo_ms",
    ):
        assert key in r, key
    assert set(r["max_rate_under_slo"]) >= {"cmserve", "litserve", "plain", "cmserve_no_batching"}
    for name, cfg in r["configs"].items():
        sent = sum(row["sent"] for row in cfg["sweep"])
        answered = sum(sum(row["statuses"].values()) for row in cfg["sweep"])
        assert sent == answered > 0, name  # open loop: every request sent got a status
        assert all(row["errors"] == 0 for row in cfg["sweep"]), (name, cfg["sweep"])
    assert r["configs"]["cmserve"]["sweep"][0]["server_p50_ms"] is not None
    # the ratios use the raw sampler timed right before and after the figures they divide
    checks = {(c["when"], c["batch"]): c["ms_per_batch"] for c in r["raw_checks"]}
    b1 = [checks[("before cmserve idle", 1)], checks[("after cmserve idle", 1)]]
    assert r["raw_batch1_ms"] == pytest.approx(sum(b1) / 2, abs=1e-3)
    cm = r["configs"]["cmserve"]
    assert cm["max_batch_size"] in {1, 2, 4, 8, 16, 32, 64}  # the auto choice, read from its gauge
    assert r["configs"]["cmserve_no_batching"]["max_batch_size"] == 1
    last = cm["sweep"][-1]  # the last rate always gets its own raw figure, timed around it
    b64 = [checks[(f"before cmserve at {last['rate_rps']} req/s", 64)]]
    b64.append(checks[(f"after cmserve at {last['rate_rps']} req/s", 64)])
    # the checks keep ms to 3 decimals: at a few ms per batch that alone moves images/s by ~0.01 %
    assert last["raw_images_per_s"] == pytest.approx(sum(64e3 / ms for ms in b64) / 2, rel=5e-4)
    assert r["raw_images_per_s"] in {row.get("raw_images_per_s") for row in cm["sweep"]}
    assert r["idle_overhead_ms"] == pytest.approx(cm["idle_p50_ms"] - r["raw_batch1_ms"], abs=1e-2)
    assert r["efficiency"] == pytest.approx(cm["saturation_images_per_s"] / r["raw_images_per_s"], abs=1e-2)
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_threads_bench_runs_every_case(tmp_path: Path) -> None:
    from bench.threads import CASES, run
    from models.placeholder import build_placeholder

    ckpt = build_placeholder(tmp_path / "tiny")
    rows = run(str(ckpt), [1, 2], repeats=1, rounds=1)
    assert [r["case"] for r in rows] == list(CASES)
    assert all(set(r["ms_per_batch"]) == {1, 2} and min(r["ms_per_batch"].values()) > 0 for r in rows)


def test_frontend_bench_quick(tmp_path: Path) -> None:
    """Each front end, serving a model that answers at once, answers every request and reports
    the CPU its process group used (its requests per CPU-second); cmserve with one and with two
    front-end processes, loaded by two client processes, and with each of its own measures
    taken away in turn (the short path, the collector settings, the C HTTP parser)."""
    from bench.frontend import PEERS

    r = _bench(
        "frontend", "--concurrency", "8", "--frontends", "1,2", "--clients", "2",
        "--peers", ",".join(PEERS), tmp=tmp_path,
    )  # fmt: skip
    assert set(r["servers"]) == {"cmserve", "cmserve_2fe", *PEERS}
    for name, s in r["servers"].items():
        assert s["errors"] == 0 and s["ok"] > 0, (name, s)
        assert s["requests_per_s"] > 0 and s["server_cpu_cores"] > 0 and s["requests_per_cpu_s"] > 0, (
            name,
            s,
        )


def test_batching_bench_quick(tmp_path: Path) -> None:
    r = _bench("batching", tmp=tmp_path)
    (w,) = r["workloads"].values()
    assert w["saturation_rps"] > 0 and [row["mode"] for row in w["rows"]] == ["request", "step"]
    for row in w["rows"]:
        assert row["errors"] == 0 and row["ok"] == row["sent"] > 0
        assert row["2-step"]["n"] + row.get("32-step", {"n": 0})["n"] == row["ok"]


def test_quality_bench_quick(tmp_path: Path) -> None:
    r = _bench("quality", tmp=tmp_path)
    rows = {(t["tier"], t["policy"]): t for t in r["tiers"]}
    assert set(rows) == {("fast", p) for p in ("return", "resample", "escalate")} | {
        ("reference", "return"), ("reference", "resample"),
    }  # fmt: skip
    for t in r["tiers"]:
        assert t["images_drawn"] >= t["images_returned"] > 0 and 0 <= t["acceptance"] <= 1
        assert t["ms_per_image_drawn"] > 0 and t["mean_attempts"] >= 1
    # one draw per image under `return`; the reference tier costs more per image than `fast`
    assert rows[("fast", "return")]["mean_attempts"] == 1
    assert (
        rows[("reference", "return")]["ms_per_image_drawn"] > rows[("fast", "return")]["ms_per_image_drawn"]
    )
    assert [o["allow_degrade"] for o in r["overload"]] == [False, True]
    assert r["overload"][0]["degraded_share"] == 0 and r["saturation_rps"] > 0
    plain, shadow = r["shadow"]
    assert (plain["shadow_fraction"], plain["shadow_comparisons"]) == (0.0, 0)
    assert shadow["shadow_fraction"] == 1.0 and shadow["ok"] > 0


def test_peers_serve_the_shipped_model_alone_and_unchecked() -> None:
    """The peers' engine (LitServe, plain) does no work cmserve's peers would not: the shipped
    model without its accept check (which cmserve's runner would run in every batch) and
    without the teacher cmserve loads as its reference tier."""
    from bench.peers import engine_settings
    from server.engine import Engine
    from server.metrics import Metrics
    from server.settings import DEFAULT_CHECKPOINT

    e = Engine(engine_settings(str(DEFAULT_CHECKPOINT)), Metrics())
    try:
        assert list(e.models) == ["cm-mnist"]
        assert e.get().scorer is None and e.get().runner.scorer is None
    finally:
        e.close()
