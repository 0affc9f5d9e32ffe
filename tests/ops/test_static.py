"""Static validation of everything that cannot run here (no Docker engine, no cluster, no Grafana)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.ops.helpers import DEPLOY, ROOT, dashboard_exprs, run, tool

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]])
def test_compose_files_validate(files: list[str]) -> None:
    args = [a for f in files for a in ("-f", f)]
    run(tool("docker-compose"), *args, "config", "-q")
    cfg = yaml.safe_load(run(tool("docker-compose"), *args, "config").stdout)
    assert set(cfg["services"]) == {"cmserve", "prometheus", "grafana"}
    gpu = "deploy" in cfg["services"]["cmserve"]
    assert gpu == (len(files) == 1)  # the CPU override drops the GPU reservation


def test_dockerfile_lints_clean() -> None:
    run(tool("hadolint"), "--failure-threshold", "warning", "Dockerfile")
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and 'CMD ["cmserve", "serve"' in text


def _dockerfile() -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(ENV, ARG defaults, RUN/HEALTHCHECK lines) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    other = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(kv.split("=", 1) for kv in rest.split() if "=" in kv)
        elif word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        elif word in ("RUN", "HEALTHCHECK"):
            other.append(line)
    return env, args, other


def test_the_image_can_run_the_triton_kernels_as_its_user() -> None:
    """Build-free: a C compiler and Python headers (Triton's launcher), TRITON_CACHE_DIR on a path
    the user owns and the pod mounts writable, a home, healthy only when ready, torch pinned to a
    version the project runs."""
    env, args, lines = _dockerfile()
    runs = " ".join(lines)
    assert "gcc" in runs and "python3-dev" in runs
    cache = env["TRITON_CACHE_DIR"]
    assert cache.startswith("/var/cache/cmserve") and "chown -R 10001 /var/cache/cmserve" in runs
    assert "--create-home" in runs and env["HOME"] == "/home/cmserve"
    (health,) = [ln for ln in lines if ln.startswith("HEALTHCHECK")]
    assert "/readyz" in health and "/healthz" not in health
    assert args["TORCH"] in {"2.11.0", "2.13.0"} and '"torch==${TORCH}"' in runs
    deploy = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = deploy["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert "/var/cache/cmserve" in mounts  # writable under readOnlyRootFilesystem
    assert {"name": mounts["/var/cache/cmserve"], "emptyDir": {}} in pod["volumes"]


def test_the_cpu_compose_override_builds_a_cpu_image() -> None:
    cfg = yaml.safe_load(
        run(
            tool("docker-compose"), "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "config"
        ).stdout
    )
    build = cfg["services"]["cmserve"]["build"]
    assert "cuda" not in build["args"]["BASE"] and build["args"]["TORCH_INDEX"].endswith("/cpu")
    assert cfg["services"]["cmserve"]["image"] != "cmserve:latest"  # not the GPU image's tag


def test_kubernetes_manifests_validate(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl:
        rendered = tmp_path / "all.yaml"
        rendered.write_text(run(kubectl, "kustomize", str(DEPLOY / "kubernetes")).stdout)
        files = [str(rendered)]
    else:
        files = [
            str(p) for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")) if p.name != "kustomization.yaml"
        ]
    out = run(tool("kubernetes-validate"), "--strict", *files)
    assert "passed for resource deployment/cmserve" in out.stdout + out.stderr
    docs = [d for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor"} <= kinds
    dep = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = dep["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    )
    assert "preStop" in c["lifecycle"]
    grace = int(next(e["value"] for e in c["env"] if e["name"] == "CMSERVE_SHUTDOWN_GRACE_S"))
    assert dep["terminationGracePeriodSeconds"] > grace  # drain fits inside the kill deadline


def test_promtool_checks_config_and_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    run(promtool, "check", "rules", *map(str, sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))))
    out = run(promtool, "test", "rules", "tests/rules_test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out.stdout


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each panel's PromQL (wrapped as a recording rule)."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    f = tmp_path / "dash_rules.yml"
    f.write_text(yaml.safe_dump(rules))
    run(tool("promtool"), "check", "rules", str(f))
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "cmserve.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for want in (
        "p50 / p95 / p99",
        "queue wait vs batch compute",
        "images per second",
        "batch size",
        "queue depth",
        "errors",
        "padding",
    ):
        assert want in titles, want
    prov = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert prov["datasources"][0]["uid"] == dash["panels"][0]["datasource"]["uid"]


def test_termination_grace_covers_prestop_and_the_servers_drain() -> None:
    """The pod's grace period must hold the preStop sleep plus the server's whole drain, which
    `shutdown_grace_s` bounds (tests/reliability/test_shutdown.py: exit within grace + 2 s)."""
    import re

    dep = next(
        d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
        if d and d.get("kind") == "Deployment"
    )  # fmt: skip
    pod = dep["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "cmserve"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env["CMSERVE_SHUTDOWN_GRACE_S"])
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    sleep_s = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", pre_stop).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + grace + 2, (
        pod["terminationGracePeriodSeconds"],
        sleep_s,
        grace,
    )


def test_prometheusrule_equals_the_rules_files() -> None:
    """The cluster's PrometheusRule carries exactly the groups the compose stack loads."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", DEPLOY / "kubernetes" / "generate.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    assert committed == gen.manifest(), "rerun deploy/kubernetes/generate.py"
    dashboard = yaml.safe_load((DEPLOY / "kubernetes" / "dashboard-configmap.yaml").read_text())
    assert dashboard == gen.dashboard_configmap(), "rerun deploy/kubernetes/generate.py"
    assert json.loads(dashboard["data"]["cmserve.json"])["title"]  # the dashboard itself, parseable
    assert committed["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    names = {r.get("record") or r.get("alert") for g in committed["spec"]["groups"] for r in g["rules"]}
    assert "job:cmserve_request_duration_seconds:p99_rate1m" in names


def test_podmonitor_job_matches_the_rules() -> None:
    """`up{job="cmserve"}` and the dashboard's job selectors match what the operator scrapes."""
    pm = yaml.safe_load((DEPLOY / "kubernetes" / "podmonitor.yaml").read_text())
    dep = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    label = pm["spec"]["jobLabel"]
    assert dep["spec"]["template"]["metadata"]["labels"][label] == "cmserve"
    alerts = (DEPLOY / "prometheus" / "rules" / "cmserve-alerts.yml").read_text()
    assert 'job="cmserve"' in alerts
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
