"""Accept checks and tiers in a request: where it starts on its model's ladder (degrading under
the latency objective), what its policy does with rejected images, and what each drawn image
cost. The queueing itself is `server/generate.py`'s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.batcher import Job, JobResult
from server.deps import ServerState
from server.engine import ModelFacts
from server.schemas import GenerateRequest
from server.settings import Settings
from server.tiers import Tier, position, reroll_seed, step_down, step_up


@dataclass
class Drawn:
    """One image of a request as it will be served, and how it was drawn."""

    seed: int  # the seed that drew it
    pos: int  # its rung on the model's tier ladder (-1: steps outside the tiers)
    model: str
    steps: int
    image: np.ndarray | None = None
    score: float | None = None
    accepted: bool | None = None
    attempts: int = 0


@dataclass
class Policy:
    """What a request asks of its accept checks (resolved against the server's settings)."""

    on_reject: str  # return | resample | escalate
    max_attempts: int
    threshold: float


def policy_of(req: GenerateRequest, s: Settings) -> Policy:
    return Policy(
        req.on_reject or s.on_reject,
        req.max_attempts or s.max_attempts,
        s.accept_threshold if req.accept_threshold is None else float(req.accept_threshold),
    )


def start_rung(req: GenerateRequest, sm: ModelFacts, st: ServerState) -> tuple[int, str | None, bool]:
    """-> (rung the request starts at, the tier it asked for, degraded). Degrades one rung when
    the latency objective would be missed and the request allows it."""
    rungs = sm.tiers
    assert req.steps is not None  # resolved by `validate`
    pos = position(rungs, req.quality, sm.name, req.steps)
    if pos < 0:
        return -1, None, False
    asked = rungs[pos].name
    s, batcher = st.settings, st.batcher
    allow = s.allow_degrade if req.allow_degrade is None else req.allow_degrade
    if s.latency_slo_ms > 0 and allow and batcher is not None:
        rung = rungs[pos]
        down = step_down(rungs, pos)
        if down is not None and batcher.predict_s(rung.model, rung.steps) * 1e3 > s.latency_slo_ms:
            st.metrics.degraded.labels(sm.name, asked, rungs[down].name).inc()
            return down, asked, True
    return pos, asked, False


def reroll(
    drawn: list[Drawn], rungs: list[Tier], policy: Policy, attempt: int, seeds: list[int]
) -> list[int]:
    """Indices of the rejected images to draw again at `attempt`, each moved to its new seed
    (resample) or rung (escalate); an image already at the top rung stays as it is."""
    redo = []
    for i, d in enumerate(drawn):
        if d.accepted is not False:
            continue
        if policy.on_reject == "resample":
            d.seed = reroll_seed(seeds[i], attempt)
        else:
            up = step_up(rungs, d.pos) if d.pos >= 0 else None
            if up is None:
                continue
            d.pos, (d.model, d.steps) = up, rungs[up].sampler
        redo.append(i)
    return redo


def record(
    st: ServerState, rungs: list[Tier], job: Job, idx: list[int], drawn: list[Drawn], result: JobResult,
    threshold: float,
) -> None:  # fmt: skip
    """Store a job's images and scores in the request's images, and count their cost."""
    m = st.metrics
    tier = next((t.name for t in rungs if t.sampler == job.key), "custom")
    m.tier_images.labels(job.model, tier).inc(job.n)
    m.tier_compute.labels(job.model, tier).inc(result.compute_s * job.n / max(1, result.batch_images))
    for k, i in enumerate(idx):
        d = drawn[i]
        d.image, d.attempts = result.images[k], d.attempts + 1
        d.score = None if result.scores is None else float(result.scores[k])
        d.accepted = None if d.score is None else d.score >= threshold
    if result.scores is not None:
        m.scored_images.labels(job.model, tier).inc(job.n)
        m.accepted_images.labels(job.model, tier).inc(int((result.scores >= threshold).sum()))
