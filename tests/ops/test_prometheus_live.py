"""A real Prometheus scrapes a real cmserve while requests flow; recording rules, alerts' inputs
and every dashboard query return sane data over the HTTP API."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from server.metrics import LATENCY_BUCKETS
from tests.ops.helpers import DEPLOY, dashboard_exprs, tool
from tests.procs import free_port, serve_process

pytestmark = pytest.mark.slow


def _edges(lo: float, hi: float) -> tuple[float, float]:
    """Widen [lo, hi] to the histogram bucket edges around it: quantiles interpolate in buckets."""
    below = max([0.0, *(b for b in LATENCY_BUCKETS if b <= lo)])
    above = min([math.inf, *(b for b in LATENCY_BUCKETS if b >= hi)])
    return below, above


def _query(prom: str, q: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": q}, timeout=5).json()
    assert r["status"] == "success", (q, r)
    return r["data"]["result"]


def test_prometheus_scrapes_and_rules_give_sane_quantiles(tiny_ckpt: Path, tmp_path: Path) -> None:
    prometheus = tool("prometheus")
    # a scored model with a reference tier, so that the cost, acceptance and shadow panels have data
    models = ("--model", f"a={tiny_ckpt}", "--model", f"ref={tiny_ckpt}", "--reference", "a=ref",
              "--scorer", "a=tests.server.scorers:checksum", "--shadow-fraction", "0.2")  # fmt: skip
    with serve_process(*models, "--buckets", "1,2,4,8", tmp=tmp_path) as sp:
        port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))],
            "scrape_configs": [
                {"job_name": "cmserve", "static_configs": [{"targets": [sp.url.split("//")[1]]}]}
            ],
        }
        (tmp_path / "prom.yml").write_text(yaml.safe_dump(cfg))
        log = (tmp_path / "prom.log").open("wb")
        prom_proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prom.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        prom = f"http://127.0.0.1:{port}"
        try:
            latencies = []
            with httpx.Client(base_url=sp.url, timeout=30) as c:
                t_end = time.monotonic() + 14
                i = 0
                while time.monotonic() < t_end:
                    t = time.perf_counter()
                    r = c.post(
                        "/v1/generate", json={"class_label": i % 10, "n": 1 + i % 4, "steps": 1 + i % 4}
                    )
                    latencies.append(time.perf_counter() - t)
                    assert r.status_code == 200
                    if i % 20 == 0:
                        assert c.post("/v1/generate", json={"n": 0}).status_code == 422
                    i += 1
                    time.sleep(0.02)
            time.sleep(3)  # a few more scrapes and rule evaluations
            lo, hi = _edges(min(latencies), max(latencies))
            up = _query(prom, 'up{job="cmserve"}')
            assert up and up[0]["value"][1] == "1"
            for q in ("p50", "p95", "p99"):
                rec = _query(prom, f"job:cmserve_request_duration_seconds:{q}_rate1m")
                assert rec, f"recording rule {q} returned nothing"
                v = float(rec[0]["value"][1])
                assert lo <= v <= hi, (q, v, lo, hi)
            direct = _query(
                prom,
                "histogram_quantile(0.99, sum by (le) (rate("
                'cmserve_request_duration_seconds_bucket{route="/v1/generate"}[15s])))',
            )
            assert lo <= float(direct[0]["value"][1]) <= hi
            assert float(_query(prom, "job:cmserve_images_generated:rate1m")[0]["value"][1]) > 0
            mean_batch = float(_query(prom, "job:cmserve_batch_size_images:mean_rate1m")[0]["value"][1])
            assert 1 <= mean_batch <= 4
            for e in dashboard_exprs("5s"):
                assert _query(prom, e), f"dashboard query returned no data: {e}"
        finally:
            prom_proc.terminate()
            prom_proc.wait(10)
