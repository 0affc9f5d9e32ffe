"""The diffusers families on a GPU (marker `cuda`; run by `make gpu-check`): a UNet consistency
model (edm) and a prompted LCM (latent), captured into CUDA graphs, give what the same model
gives eagerly."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.gpu_engine import engine_pair, sample_pair
from tests.models.diffusers_fixtures import save_cm_dir

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("classes", [3, None], ids=["class-conditional", "unconditional"])
def test_edm_graph_replay_equals_eager(tmp_path: Path, classes: int | None) -> None:
    try:
        import diffusers  # noqa: F401
    except Exception as e:  # an old huggingface-hub on the host fails diffusers' own import checks
        pytest.skip(f"diffusers does not import here: {e}")
    cd = save_cm_dir(tmp_path / "cd", classes, {"schedules": {"1": [0], "2": [22, 0]}})
    graph, eager = engine_pair(cd, "float32", [1, 4, 16])
    assert graph.card.family == "edm"
    for steps in graph.supported_steps:
        for n in (1, 3, 16, 21):
            a, b = sample_pair(graph, eager, steps, n, 100)
            err = float((a - b).norm() / b.norm())
            assert err < 1e-5, f"steps={steps} n={n}: {err:.3g}"
    assert graph.metrics.runner_runs.labels(graph.card.name, "graph")._value.get() > 0
    graph.close()
    eager.close()


def test_latent_graph_replay_equals_eager(tmp_path: Path) -> None:
    """A prompted LCM (tiny random pipeline): UNet steps and VAE decode captured per bucket give
    the eager images, the prompt read from the text table inside the graph."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:
        pytest.skip(f"diffusers or transformers does not import here: {e}")
    from tests.models.lcm_fixtures import save_lcm_dir

    graph, eager = engine_pair(save_lcm_dir(tmp_path / "lcm"), "float32", [1, 4])
    assert graph.card.family == "latent"
    for e in (graph, eager):  # row 0 of each table: the padding label every image below uses
        assert e.call(e.model.conditions.acquire, "red cube", 8.0)[0] == 0
    for steps in (1, 4):
        for n in (1, 3, 5):
            a, b = sample_pair(graph, eager, steps, n, 100)
            err = float((a - b).norm() / b.norm())
            assert err < 1e-5, f"steps={steps} n={n}: {err:.3g}"
    graph.close()
    eager.close()
