"""Prometheus metrics (base unit seconds). Each app owns its registry, so tests can run many apps.

Latency histograms use buckets dense between 1 ms and 1 s so `histogram_quantile` gives usable
p50/p95/p99 in the range this server lives in.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
    disable_created_metrics,
)

# Counters and histograms would each carry a `_created` series with their creation time: noise
# that doubles the series count and that nothing here reads.
disable_created_metrics()

LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.125,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,  # the default --max-timeout-s: the slowest answer still lands in a finite bucket
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.request_latency = Histogram(
            "cmserve_request_duration_seconds",
            "Time from request arrival to response, by route and status class (2xx, 4xx, 5xx): a "
            "fast 429 must not make the p99 of served requests look better.",
            ["route", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "cmserve_queue_wait_seconds",
            "Time a request waited in the queue before its batch started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "cmserve_batch_compute_seconds",
            "Wall time of one batch on the sampler (noise, sampling, copy out).",
            ["model", "steps"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encode = Histogram(
            "cmserve_encode_seconds",
            "PNG encoding time of one request's images.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cmserve_batch_size_images",
            "Images per dispatched batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_images = Gauge("cmserve_queue_depth_images", "Images waiting in the queue.", registry=r)
        self.queue_requests = Gauge(
            "cmserve_queue_depth_requests", "Requests waiting in the queue.", registry=r
        )
        self.max_batch = Gauge(
            "cmserve_max_batch_size_images",
            "Most images per batch of the default model (set, or chosen at warm-up).",
            registry=r,
        )
        self.queue_limit = Gauge(
            "cmserve_queue_limit_images", "Queue bound in images (429 beyond).", registry=r
        )
        self.inflight = Gauge(
            "cmserve_inflight_requests", "Generate requests accepted and not yet answered.", registry=r
        )
        self.requests = Counter(
            "cmserve_requests_total", "HTTP requests by route and status code.", ["route", "code"], registry=r
        )
        self.images = Counter(
            "cmserve_images_generated_total", "Images generated and returned.", ["model"], registry=r
        )
        self.edits = Counter(
            "cmserve_edit_images_total",
            "Images returned by the editing routes, by model and mode.",
            ["model", "mode"],
            registry=r,
        )
        self.rejected = Counter(
            "cmserve_rejected_total",
            "Requests refused or dropped before compute, by reason.",
            ["reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "cmserve_batch_failures_total",
            "Batches that failed (every request in them got 500).",
            ["reason"],
            registry=r,
        )
        self.padded_rows = Counter(
            "cmserve_padded_rows_total",
            "Rows computed only to pad a batch up to its bucket.",
            ["model"],
            registry=r,
        )
        self.computed_rows = Counter(
            "cmserve_computed_rows_total",
            "Rows computed by the runner, padding included.",
            ["model"],
            registry=r,
        )
        self.runner_runs = Counter(
            "cmserve_runner_executions_total",
            "Runner executions by mode (graph replay or eager).",
            ["model", "mode"],
            registry=r,
        )
        self.capture_seconds = Gauge(
            "cmserve_graph_capture_seconds", "Time spent warming up and capturing at start-up.", registry=r
        )
        self.capture_memory = Gauge(
            "cmserve_graph_pool_bytes", "Device memory held by the captured graphs, all models.", registry=r
        )
        self.model_memory = Gauge(
            "cmserve_model_memory_bytes",
            "Memory a model holds on its device: its weights, and its captured graphs' pool.",
            ["model", "part"],
            registry=r,
        )
        self.model_info = Gauge(
            "cmserve_model_info",
            "1 per served model, labelled with its family, kind and whether it is an untrained placeholder.",
            ["model", "family", "kind", "placeholder"],
            registry=r,
        )
        # Cost per accepted output: every image drawn (re-rolls included) and its share of its
        # batch's compute time, against the images that passed their accept check, by the model
        # and tier that drew them. Recording rules divide them (deploy/prometheus/rules).
        self.tier_images = Counter(
            "cmserve_tier_images_total",
            "Images drawn per model and quality tier, re-rolls and escalations included.",
            ["model", "tier"],
            registry=r,
        )
        self.tier_compute = Counter(
            "cmserve_tier_compute_seconds_total",
            "Compute seconds spent drawing them (each image's share of its batch's wall time).",
            ["model", "tier"],
            registry=r,
        )
        self.scored_images = Counter(
            "cmserve_scored_images_total",
            "Images an accept check scored.",
            ["model", "tier"],
            registry=r,
        )
        self.accepted_images = Counter(
            "cmserve_accepted_images_total",
            "Images that passed their accept check.",
            ["model", "tier"],
            registry=r,
        )
        self.rerolls = Counter(
            "cmserve_rerolled_images_total",
            "Rejected images drawn again, by policy (resample: new seed; escalate: next tier up).",
            ["model", "policy"],
            registry=r,
        )
        self.degraded = Counter(
            "cmserve_degraded_requests_total",
            "Requests run one tier below the one asked, to meet --latency-slo-ms.",
            ["model", "from_tier", "to_tier"],
            registry=r,
        )
        self.shadow = Counter(
            "cmserve_shadow_comparisons_total",
            "Shadow draws at the reference tier compared with the served image: agree = both accepted "
            "or both rejected.",
            ["model", "tier", "agree"],
            registry=r,
        )
        self.shadow_gap = Histogram(
            "cmserve_shadow_score_gap",
            "Reference image's score minus the served image's, per shadow comparison.",
            ["model", "tier"],
            buckets=(-1.0, -0.5, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.shadow_dropped = Counter(
            "cmserve_shadow_dropped_total",
            "Shadow draws not queued because the shadow backlog was full.",
            registry=r,
        )
        self.text_cache = Counter(
            "cmserve_text_cache_lookups_total",
            "A prompted model's text-embedding table lookups: hit (encoded before) or miss (encoded now).",
            ["model", "result"],
            registry=r,
        )
        self.ready = Gauge(
            "cmserve_ready", "1 once the model is loaded and warmed up, 0 otherwise.", registry=r
        )
        self.draining = Gauge("cmserve_draining", "1 while shutting down (draining), else 0.", registry=r)
        self.build_info = Gauge(
            "cmserve_build_info",
            "1, labelled with the versions this process runs.",
            ["version", "python", "torch"],
            registry=r,
        )
        self.build_info.labels(_version("cmserve"), platform.python_version(), _version("torch")).set(1)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, _cpu_seconds_total, _open_fds, ...
        # Export every known label value at 0 from the start, so rates and alerts see a series
        # before the first event instead of nothing.
        for reason in (
            "queue_full", "key_queue_share", "batch_queue_share", "key_rate", "deadline", "disconnected",
            "text_cache_full",
            "draining",
        ):  # fmt: skip
            self.rejected.labels(reason)
        for reason in ("exception", "nonfinite"):
            self.batch_failures.labels(reason)


# One process's samples as plain data (what a front-end process sends the engine process):
# [(family name, type, help, unit, [(sample name, labels, value)])]
Families = list[tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]]
# Kinds whose value is a level of one process (readiness, queue depth, memory), not a count that
# adds up across processes; but SUMMED_GAUGES count what each process holds a part of.
LEVEL_KINDS = ("gauge", "info", "stateset")
SUMMED_GAUGES = frozenset({"cmserve_inflight_requests"})


def families(registry: CollectorRegistry) -> Families:
    return [
        (m.name, m.type, m.documentation, m.unit, [(s.name, s.labels, s.value) for s in m.samples])
        for m in registry.collect()
    ]


def added(base: Families, more: Families, levels: frozenset[str] = frozenset()) -> Families:
    """`base` with `more`'s samples added, sample by sample (so rates and quantiles cover both);
    `more`'s levels (LEVEL_KINDS) are left out but for the gauges named in `levels`."""
    out: dict[str, tuple[str, str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for i, fams in enumerate((base, more)):
        for name, kind, doc, unit, samples in fams:
            if i and kind in LEVEL_KINDS and name not in levels:
                continue
            values = out.setdefault(name, (kind, doc, unit, {}))[3]
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + value
    return [
        (name, kind, doc, unit, [(s, dict(pairs), v) for (s, pairs), v in values.items()])
        for name, (kind, doc, unit, values) in out.items()
    ]


class Merged:
    """The engine process's metrics with its front ends' added: counters and histograms summed,
    gauges the engine's own but for SUMMED_GAUGES. `generate_latest(Merged(...))` is the
    exposition."""

    def __init__(self, own: CollectorRegistry, others: list[Families]) -> None:
        self.own, self.others = own, others

    def collect(self) -> list[Metric]:
        fams = families(self.own)
        for other in self.others:
            fams = added(fams, other, SUMMED_GAUGES)
        out = []
        for name, kind, doc, unit, samples in fams:
            metric = Metric(name, doc, kind, unit)
            for sname, labels, value in samples:
                metric.add_sample(sname, labels, value)
            out.append(metric)
        return out


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
