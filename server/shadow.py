"""Shadow mode (`--shadow-fraction p`): a share p of requests also has its first image drawn at
the model's reference tier, with the same seed and class, and both images' accept-check scores
are compared (metrics only; the client never sees it).

The reference draw is background work of the batcher: it runs one network evaluation at a time,
only while no request waits, so a request arriving meanwhile waits for one evaluation at most,
never for a whole 32-step reference sample.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.editing import Constraint
from models.sampler import consistency_step, ode_step
from server.batcher import Batcher
from server.engine import Engine, ModelFacts, ServedModel
from server.metrics import Metrics
from server.tiers import Tier

if TYPE_CHECKING:
    from server.accept import Drawn
    from server.deps import ServerState


class ShadowDraw:
    """One reference-tier image, drawn one evaluation per call on the compute thread (eagerly,
    with the request path's noise and schedule, so it is the image a `reference` request with
    this seed gets), then scored and compared with the served image."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        served: tuple[str, str, float, bool],
        ref: Tier,
        label: int | None,
        seed: int,
        threshold: float,
    ) -> None:
        self.engine, self.metrics, self.ref = engine, metrics, ref
        self.served = served  # (model, tier, score, accepted) of the image served
        self.label, self.seed, self.threshold = label, seed, threshold
        self.i = 0
        self.state: dict[str, Any] = {}
        self.image: np.ndarray | None = None  # uint8 [1, H, W, C] once drawn
        self.score: float | None = None

    def _begin(self) -> None:
        m = self.engine.get(self.ref.model)
        dev = self.engine.device
        card = m.card
        sched = torch.tensor(card.schedules[self.ref.steps], dtype=torch.float32, device=dev)
        ode = card.kind != "consistency"
        self.state = {
            "m": m,
            "noise": self.engine.make_noise(self.ref.steps, [self.seed], self.ref.model).to(dev),
            "t": sched,
            "ode": ode,
            "evals": sched.shape[0] - 1 if ode else self.ref.steps,
            "y": torch.tensor([card.pad_label if self.label is None else self.label], device=dev),
            "x": torch.zeros((1, card.channels, card.image_size, card.image_size), device=dev),
            "edit": Constraint.empty(1, (card.channels, card.image_size, card.image_size), dev),
        }

    @torch.inference_mode()
    def __call__(self) -> bool:
        """One evaluation; True once the image is drawn, scored and compared."""
        if not self.state:
            self._begin()
        s, i = self.state, self.i
        m: ServedModel = s["m"]
        first = torch.tensor([i == 0], device=s["x"].device)
        t = s["t"][i].expand(1)
        if s["ode"]:
            velocity, sigma_d = m.model.ode_velocity, m.model.sigma_d  # type: ignore[attr-defined]
            s["x"] = ode_step(
                velocity, s["x"], s["noise"][0], t, s["t"][i + 1].expand(1), first, s["y"], sigma_d
            )
        else:
            s["x"] = consistency_step(m.model, s["x"], s["noise"][i], t, first, s["y"], s["edit"])
        self.i += 1
        if self.i < s["evals"]:
            return False
        self.image = m.card.to_uint8(s["x"])
        scores = self.engine.score(self.ref.model, self.image, [self.label])
        if scores is not None:
            self.score = float(scores[0])
            model, tier, served_score, served_ok = self.served
            agree = (self.score >= self.threshold) == served_ok
            self.metrics.shadow.labels(model, tier, str(agree).lower()).inc()
            self.metrics.shadow_gap.labels(model, tier).observe(self.score - served_score)
        self.state = {}
        return True


def maybe_shadow(st: ServerState, sm: ModelFacts, label: int | None, d: Drawn, threshold: float) -> None:
    """With probability --shadow-fraction, queue a shadow draw of served image `d`: where the
    model has a reference tier, the image was scored, and it was not itself drawn there."""
    if random.random() >= st.settings.shadow_fraction or st.batcher is None or st.engine is None:
        return
    if sm.card.conditioning_text:  # its label is a text-table row, released by now
        return
    ref = next((t for t in sm.tiers if t.name == "reference"), None)
    if ref is None or d.score is None or d.accepted is None or d.pos < 0 or sm.tiers[d.pos] == ref:
        return
    args = (sm.name, label, d.seed, d.pos, d.score, d.accepted, threshold)
    if isinstance(st.engine, Engine):
        queue_shadow(st, *args)
    else:  # a front-end process: the engine process draws it
        st.engine.shadow(*args)  # type: ignore[attr-defined]


def queue_shadow(
    st: ServerState, model: str, label: int | None, seed: int, pos: int, score: float, accepted: bool,
    threshold: float,
) -> None:  # fmt: skip
    """Queue the reference-tier draw of the image served at tier `pos` of `model`."""
    assert isinstance(st.engine, Engine) and isinstance(st.batcher, Batcher)
    sm = st.engine.get(model)
    ref = next(t for t in sm.tiers if t.name == "reference")
    served = (sm.name, sm.tiers[pos].name, score, accepted)
    draw = ShadowDraw(st.engine, st.metrics, served, ref, label, seed, threshold)
    if not st.batcher.submit_background(draw):
        st.metrics.shadow_dropped.inc()
