"""The runner's bucketing, padding and chunking (the code path the GPU uses, run eagerly here),
and per-request determinism across batch compositions through the engine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.sampler import consistency_sample
from server.engine import Engine
from server.metrics import Metrics
from server.runner import SamplerRunner
from server.settings import Settings


def _runner(ckpt: Path, buckets: list[int]) -> SamplerRunner:
    model, card = load_checkpoint(ckpt)
    r = SamplerRunner(model, card.info(), buckets, torch.device("cpu"), metrics=Metrics())
    r.warmup([1, 2])
    return r


@pytest.mark.parametrize(
    ("B", "chunks", "padded"), [(1, [1], 0), (3, [4], 1), (7, [4, 4], 1), (9, [4, 4, 1], 0)]
)
def test_padding_and_chunking(tiny_ckpt: Path, B: int, chunks: list[int], padded: int) -> None:
    r = _runner(tiny_ckpt, [1, 2, 4])
    torch.manual_seed(B)
    noise = torch.randn(2, B, 1, 28, 28)
    labels = torch.randint(0, 11, (B,))
    name = r.card.name
    before = r.metrics.runner_runs.labels(name, "eager")._value.get()
    out = r.run(2, noise, labels)
    assert r.metrics.runner_runs.labels(name, "eager")._value.get() - before == len(chunks)
    assert r.metrics.padded_rows.labels(name)._value.get() == padded
    assert r.metrics.computed_rows.labels(name)._value.get() == sum(chunks)
    expect = consistency_sample(r.model, noise, labels, torch.tensor(r.card.schedules[2]))
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)


def test_served_images_are_the_output_quantized_with_each_rows_finiteness(tiny_ckpt: Path) -> None:
    """run_images (a served batch: uint8 made beside the output, in the graph on a GPU) gives
    exactly the pixels to_uint8 makes of run's output, over chunks and padding; a row sampled
    from a NaN is flagged alone, and the slot's next batch is finite again."""
    r = _runner(tiny_ckpt, [1, 4])
    torch.manual_seed(0)
    noise = torch.randn(2, 6, 1, 28, 28)  # chunks of 4 and 2 (padded to 4)
    labels = torch.randint(0, 11, (6,))
    images, finite, _ = r.run_images(2, noise, labels)
    assert images.dtype == np.uint8 and images.shape == (6, 28, 28, 1)
    assert np.array_equal(images, r.card.to_uint8(r.run(2, noise, labels)))
    assert finite.tolist() == [True] * 6
    bad = noise.clone()
    bad[:, 4].fill_(float("nan"))
    assert r.run_images(2, bad, labels)[1].tolist() == [True] * 4 + [False, True]
    assert r.run_images(2, noise, labels)[1].all()


def test_a_device_scorer_scores_each_row_where_the_images_are_made(tiny_ckpt: Path) -> None:
    """With a device scorer the runner scores every served batch beside its pixels (in the graph
    on a GPU): over chunks and padding each row's score is what the scorer's own eager pass
    gives its served pixels for its requested class (-1: none asked, the best class's), and a
    batch that asks other classes of the same pixels gets those classes' scores."""
    from models.scorers import ClassifierScorer, DeviceScorer

    model, card = load_checkpoint(tiny_ckpt)
    scorer = ClassifierScorer(card.info())
    assert isinstance(scorer, DeviceScorer)
    r = SamplerRunner(model, card.info(), [1, 4], torch.device("cpu"), metrics=Metrics(), scorer=scorer)
    r.warmup([2])
    torch.manual_seed(0)
    noise = torch.randn(2, 6, 1, 28, 28)  # chunks of 4 and 2 (padded to 4)
    labels = torch.randint(0, 10, (6,))
    wanted: list[int | None] = [int(y) for y in labels]
    wanted[1] = wanted[5] = None
    asked = torch.tensor([-1 if y is None else y for y in wanted])
    images, _, scores = r.run_images(2, noise, labels, asked=asked)
    assert scores is not None and scores.shape == (6,)
    np.testing.assert_allclose(scores, scorer(images, wanted), rtol=1e-5, atol=1e-6)
    other = [(y + 3) % 10 for y in labels.tolist()]
    again = r.run_images(2, noise, labels, asked=torch.tensor(other))[2]
    assert again is not None
    np.testing.assert_allclose(again, scorer(images, list(other)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(again, scores)
    assert r.run_images(2, noise, labels)[2] is None  # nothing asked, nothing handed back
    with pytest.raises(ValueError, match="no scorer"):
        _runner(tiny_ckpt, [4]).run_images(2, noise, labels, asked=asked)


def test_the_engine_hands_out_the_graphs_scores_for_its_own_batch_only(tiny_ckpt: Path) -> None:
    """`Engine.score` right after `run_batch` returns the scores the batch's graph made (the
    scorer's eager pass is not run again); any other images are scored by that eager pass."""
    from models.scorers import ClassifierScorer

    name = load_checkpoint(tiny_ckpt)[1].info().name
    settings = Settings(checkpoint=str(tiny_ckpt), buckets=[1, 4], scorers=[f"{name}=mnist-lenet"])
    e = Engine(settings, Metrics())
    try:
        e.warmup()
        sm = e.get()
        assert isinstance(sm.scorer, ClassifierScorer) and sm.runner.scorer is sm.scorer
        eager_calls = []
        real = sm.scorer.__call__

        def counted(images: np.ndarray, labels: list[int | None]) -> np.ndarray:
            eager_calls.append(len(labels))
            return real(images, labels)

        sm.scorer = counted  # type: ignore[assignment]  # the eager pass, counted
        labels: list[int | None] = [3, None, 7]
        images = e.call(e.run_batch, 2, labels, [1, 2, 3])
        scores = e.call(e.score, name, images, labels)
        assert eager_calls == []
        np.testing.assert_allclose(scores, real(images, labels), rtol=1e-5, atol=1e-6)
        copy = images.copy()
        np.testing.assert_allclose(e.call(e.score, name, copy, labels), scores, rtol=1e-5, atol=1e-6)
        assert eager_calls == [3]
    finally:
        e.close()


def test_the_shipped_model_is_checked_unless_its_scorer_is_none() -> None:
    """The shipped models (the consistency model and its teacher, whose ODE slots score too) get
    the LeNet check by default, run in their batches; `MODEL=none` serves one unchecked
    (nothing scored, in the batch or after it)."""
    from models.scorers import ClassifierScorer
    from server.settings import DEFAULT_CHECKPOINT

    for scorers, checked in (([], True), (["cm-mnist=none"], False)):
        e = Engine(Settings(checkpoint=str(DEFAULT_CHECKPOINT), buckets=[1], scorers=scorers), Metrics())
        try:
            assert sorted(e.models) == ["cm-mnist", "teacher-mnist"]
            e.warmup()
            for name, sm in e.models.items():
                on = checked or name == "teacher-mnist"
                assert sm.accept_check is on
                assert isinstance(sm.runner.scorer, ClassifierScorer) is on
                steps = sm.card.steps_default
                images = e.call(e.run_batch, steps, [3], [1], name)
                scores = e.call(e.score, name, images, [3])
                if on:
                    assert sm.scorer is not None
                    np.testing.assert_allclose(scores, sm.scorer(images, [3]), rtol=1e-5, atol=1e-6)
                else:
                    assert scores is None
        finally:
            e.close()


def test_plain_batches_run_no_edit_ops_and_edit_batches_do(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch without edits runs the slot's plain variant (no constraint projection); a batch
    with any edit runs the edited one, and the plain batch after it is back on the plain one
    with the slot's times reset."""
    from models.editing import Constraint

    r = _runner(tiny_ckpt, [4])
    projections = {"n": 0}
    project = Constraint.project

    def counted(self: Constraint, x0: torch.Tensor) -> torch.Tensor:
        projections["n"] += 1
        return project(self, x0)

    monkeypatch.setattr(Constraint, "project", counted)
    noise, labels = torch.randn(2, 3, 1, 28, 28), torch.tensor([1, 2, 3])
    plain = r.run(2, noise, labels)
    assert projections["n"] == 0
    edit = Constraint.empty(3, (1, 28, 28))
    edit.keep[0] = 1.0  # row 0 keeps the (zero) reference: an inpainting of every pixel
    times = torch.tensor(r.card.schedules[2])[:, None].repeat(1, 3)
    edited = r.run(2, noise, labels, edit, times)
    assert projections["n"] == 2  # one projection per step
    assert torch.equal(edited[1:], plain[1:]) and not torch.equal(edited[0], plain[0])
    assert torch.equal(r.run(2, noise, labels), plain) and projections["n"] == 2


def test_bucket_for_picks_the_smallest_that_fits(tiny_ckpt: Path) -> None:
    r = _runner(tiny_ckpt, [1, 2, 4, 8])
    assert [r.bucket_for(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert len(r.slots) == 8  # 4 buckets x 2 step counts, all built at warm-up


def test_padding_rows_do_not_leak_into_real_rows(tiny_ckpt: Path) -> None:
    r = _runner(tiny_ckpt, [4])
    noise = torch.randn(1, 4, 1, 28, 28)
    labels = torch.tensor([1, 2, 3, 4])
    r.run(1, noise, labels)  # fill the buffers with other data
    one = r.run(1, noise[:, :1] * 0.5, labels[:1])
    alone = consistency_sample(r.model, noise[:, :1] * 0.5, labels[:1], torch.tensor(r.card.schedules[1]))
    torch.testing.assert_close(one, alone, rtol=1e-4, atol=1e-5)


def test_a_request_gives_the_same_images_alone_and_in_any_batch(tiny_ckpt: Path) -> None:
    """Request (seed 42, class 3, n 2) alone, with 3 others, with 30 others: same images."""
    engine = Engine(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 2, 4, 8, 16, 32, 64]), Metrics())
    engine.warmup()
    mine_labels, mine_seeds = [3, 3], [42, 43]
    alone = engine.sample(2, mine_labels, mine_seeds)

    def batched(k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(k)
        others_l = [int(v) for v in torch.randint(0, 10, (k,), generator=g)]
        others_s = [int(v) for v in torch.randint(0, 10_000, (k,), generator=g)]
        pos = k // 2  # somewhere in the middle of the batch
        out = engine.sample(
            2, others_l[:pos] + mine_labels + others_l[pos:], others_s[:pos] + mine_seeds + others_s[pos:]
        )
        return out[pos : pos + 2]

    for k in (3, 30):
        torch.testing.assert_close(batched(k), alone, rtol=1e-4, atol=1e-5)
    # and a different seed really gives different images
    assert not torch.allclose(engine.sample(2, mine_labels, [7, 8]), alone)


def test_auto_max_batch_picks_the_smallest_bucket_near_the_best_rate(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 2, 4, 8, 16]), Metrics())
    engine.warmup()
    timed = engine.call(engine.runner.time_buckets, 2)
    assert set(timed) == {1, 2, 4, 8, 16} and all(s > 0 for s in timed.values())
    # images/s 10, 20, 40, 78, 80: 8 is within 5% of the best (16), 4 is not
    fake = {1: 0.1, 2: 0.1, 4: 0.1, 8: 8 / 78, 16: 16 / 80}
    monkeypatch.setattr(engine.runner, "time_buckets", lambda steps, *a: fake)
    assert engine.auto_max_batch() == 8
    assert engine.auto_max_batch(tolerance=0.0) == 16
    # where batching buys nothing, no batching
    monkeypatch.setattr(engine.runner, "time_buckets", lambda steps, *a: {b: 0.01 * b for b in fake})
    assert engine.auto_max_batch() == 1
    engine.close()


def test_bucket_timing_stops_past_the_peak_and_within_its_budget(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 2, 4, 8, 16]), Metrics())
    engine.warmup()
    calls: list[int] = []
    seconds = {1: 0.01, 2: 0.01, 4: 0.04, 8: 0.04, 16: 0.01}  # images/s 100, 200, 100: past the peak

    def fake_replay(slot):  # type: ignore[no-untyped-def]
        calls.append(slot.bucket)
        time.sleep(seconds[slot.bucket])

    monkeypatch.setattr("server.runner.replay", fake_replay)
    timed = engine.runner.time_buckets(2, rounds=3, past_peak=0.10)
    assert set(timed) == {1, 2, 4} and calls == [1, 2, 4] * 3  # 8 and 16 never timed
    calls.clear()
    timed = engine.runner.time_buckets(2, rounds=3, budget_s=0.0)  # one round, however fast
    assert set(timed) == {1, 2, 4, 8, 16} and calls == [1, 2, 4, 8, 16]
    engine.close()
