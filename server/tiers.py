"""Quality tiers: what `quality` in a request maps to, per model, and the seeds of re-rolls.

A model's ladder, cheapest first: `fast` = its fewest steps, `standard` = its default steps,
`high` = its most steps, `reference` = a slower model's default (for the shipped model its
diffusion teacher's guided 32-step ODE), where one is configured. A diffusion model's own ladder
is just `reference`. Escalating moves one rung up to a sampler that differs; degrading one down.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.interface import ModelInfo

TIERS = ("fast", "standard", "high", "reference")
# A re-rolled image's seed stays below 2^53 (exact in JavaScript) like every random seed.
SEED_SPACE = 2**53


@dataclass(frozen=True)
class Tier:
    name: str  # one of TIERS
    model: str  # the served model that draws it
    steps: int

    @property
    def sampler(self) -> tuple[str, int]:
        return self.model, self.steps


def ladder(card: ModelInfo, reference: ModelInfo | None = None) -> list[Tier]:
    """`card`'s tiers, cheapest first (see the module docstring)."""
    if card.kind == "diffusion":
        return [Tier("reference", card.name, card.steps_default)]
    steps = card.steps
    rungs = [
        Tier("fast", card.name, steps[0]),
        Tier("standard", card.name, card.steps_default),
        Tier("high", card.name, steps[-1]),
    ]
    if reference is not None:
        rungs.append(Tier("reference", reference.name, reference.steps_default))
    return rungs


def position(rungs: list[Tier], quality: str | None, model: str, steps: int) -> int:
    """Index of the rung a request runs at: its `quality`, else the rung its `steps` on `model`
    are (`standard` where several are), else -1: steps outside the ladder."""
    if quality is not None:
        return [t.name for t in rungs].index(quality)
    own = [i for i, t in enumerate(rungs) if t.sampler == (model, steps)]
    return next((i for i in own if rungs[i].name == "standard"), own[0] if own else -1)


def step_up(rungs: list[Tier], pos: int) -> int | None:
    """The next rung above `pos` that is a different sampler, or None at the top."""
    for i in range(pos + 1, len(rungs)):
        if rungs[i].sampler != rungs[pos].sampler:
            return i
    return None


def step_down(rungs: list[Tier], pos: int) -> int | None:
    """The next rung below `pos` that is a different sampler, or None at the bottom."""
    for i in range(pos - 1, -1, -1):
        if rungs[i].sampler != rungs[pos].sampler:
            return i
    return None


def reroll_seed(seed: int, attempt: int) -> int:
    """The seed of an image's `attempt`-th draw (1 = its own seed): a SplitMix64 hash of both,
    so re-rolls of neighbouring images (seed, seed + 1, ...) do not collide."""
    if attempt == 1:
        return seed
    z = (seed + attempt * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % SEED_SPACE
