from __future__ import annotations

import math

import pytest
import torch

from models.config import PRESETS, DiTConfig
from models.consistency import DEFAULT_SCHEDULES, T_MAX, TrigFlow, teacher_times, validate_schedule
from models.dit import DiT
from models.sampler import consistency_sample, ode_sample


def _model(seed: int = 0) -> TrigFlow:
    torch.manual_seed(seed)
    net = DiT(PRESETS["tiny"])
    with torch.no_grad():
        for p in net.parameters():  # wake up the zero-initialized layers so F is not 0
            p.add_(0.05 * torch.randn_like(p))
    return TrigFlow(net).eval()


def test_boundary_condition_holds_exactly_at_t0() -> None:
    m = _model()
    x = torch.randn(5, 1, 28, 28)
    y = torch.tensor([0, 3, 9, 10, 2])
    out = m(x, torch.zeros(5), y)
    assert torch.equal(out, x)
    # and away from 0 the network matters
    assert not torch.allclose(m(x, torch.full((5,), 0.7), y), x)


def test_network_output_has_input_shape_and_depends_on_label() -> None:
    m = _model()
    x = torch.randn(2, 1, 28, 28)
    t = torch.full((2,), 1.0)
    a = m.net(x, t, torch.tensor([1, 1]))
    b = m.net(x, t, torch.tensor([1, 2]))
    assert a.shape == x.shape
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_residual_stream_reaches_the_fused_norms_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    # a strided stream ([B, D, N] order, as the patch conv leaves it) would make every fused norm
    # copy it first: on an H100 at DiT-B/2 batch 256 that was 4 transposing copies of the whole
    # stream per 2-step batch
    import kernels

    seen: list[bool] = []
    for name in ("adaln_norm", "residual_adaln_norm"):
        op = getattr(kernels, name)

        def spy(x: torch.Tensor, *a: object, _op=op, **k: object) -> object:  # type: ignore[no-untyped-def]
            seen.append(x.is_contiguous())
            return _op(x, *a, **k)

        monkeypatch.setattr(kernels, name, spy)
    m = _model()
    m.net(torch.randn(3, 1, 28, 28), torch.full((3,), 1.0), torch.tensor([1, 2, 3]))
    assert len(seen) == 1 + 2 * m.net.cfg.depth and all(seen)


@torch.no_grad()
def test_packed_modulation_is_one_matmul_with_the_same_result() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.n += func.__name__.split(".")[0] in ("addmm", "mm")
            return func(*args, **(kwargs or {}))

    m = _model()
    net = m.net
    names = {k: v.clone() for k, v in net.state_dict().items()}
    x, t, y = torch.randn(3, 1, 28, 28), torch.full((3,), 1.0), torch.tensor([1, 2, 10])
    with Matmuls() as per_layer:
        a = net(x, t, y)
    net.pack_modulation()
    with Matmuls() as packed:
        b = net(x, t, y)
    # depth + 1 projections (every block's and the final layer's) became one
    assert per_layer.n - packed.n == net.cfg.depth
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # checkpoints see the same names, shapes and values
    sd = net.state_dict()
    assert sd.keys() == names.keys() and all(torch.equal(sd[k], v) for k, v in names.items())
    # loading weights writes through the views: the packed matmul uses the new ones
    other = _model(seed=1).net
    net.load_state_dict(other.state_dict())
    assert net._packed() is not None
    torch.testing.assert_close(net(x, t, y), other(x, t, y), atol=1e-6, rtol=0)
    # moving the module gives each parameter its own storage: back to one matmul per layer
    net.to(torch.float64)
    assert net._packed() is None
    torch.testing.assert_close(net(x.double(), t, y).float(), other(x, t, y), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [PRESETS["tiny"], DiTConfig(image_size=32, channels=4, patch_size=2, width=64, depth=1, num_heads=2)],
    ids=["mnist-like", "latent-like"],
)
def test_patch_embedding_as_a_matmul_is_the_conv(cfg: DiTConfig) -> None:
    torch.manual_seed(0)
    net = DiT(cfg)
    x = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        net.patch.bias.normal_()  # type: ignore[union-attr]
        conv = net.patch(x).flatten(2).transpose(1, 2) + net.pos  # [B, N, D], the conv's way
        h = net.embed(x)
    assert h.shape == conv.shape and h.is_contiguous()
    torch.testing.assert_close(h, conv, atol=1e-5, rtol=1e-5)


def test_config_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        DiTConfig.from_dict({**DiTConfig().to_dict(), "bogus": 1})


def test_one_step_sampling_is_f_at_t_max_of_scaled_noise() -> None:
    m = _model()
    z = torch.randn(1, 3, 1, 28, 28)
    y = torch.tensor([1, 2, 3])
    out = consistency_sample(m, z, y, torch.tensor([T_MAX]))
    expect = m(math.sin(T_MAX) * 0.5 * z[0], torch.full((3,), T_MAX), y)
    torch.testing.assert_close(out, expect)


def test_two_step_sampling_renoises_at_t_mid() -> None:
    m = _model()
    z = torch.randn(2, 2, 1, 28, 28)
    y = torch.tensor([4, 10])
    times = torch.tensor(DEFAULT_SCHEDULES[2])
    out = consistency_sample(m, z, y, times)
    x0 = m(math.sin(T_MAX) * 0.5 * z[0], torch.full((2,), T_MAX), y)
    t = 1.1
    expect = m(math.cos(t) * x0 + math.sin(t) * 0.5 * z[1], torch.full((2,), t), y)
    torch.testing.assert_close(out, expect)


def test_ode_step_is_exact_for_an_exact_denoiser() -> None:
    """With the exact velocity of a single data point, DDIM in TrigFlow lands on it."""
    x_data = torch.randn(1, 1, 4, 4) * 0.5

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x_t = cos t x0 + sin t n  =>  v = cos t n − sin t x0, with n = (x_t − cos t x0)/sin t
        c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        n = (x - c * x_data) / s
        return c * n - s * x_data

    out = ode_sample(
        velocity,
        torch.randn(1, 1, 4, 4),
        torch.zeros(1, dtype=torch.long),
        torch.tensor(teacher_times(8), dtype=torch.float64).float(),
        0.5,
    )
    torch.testing.assert_close(out, x_data, atol=1e-4, rtol=0)


def test_schedules_validate() -> None:
    for steps, times in DEFAULT_SCHEDULES.items():
        validate_schedule(steps, times)
    with pytest.raises(ValueError, match="descending"):
        validate_schedule(2, (1.0, 1.2))
    with pytest.raises(ValueError, match="outside"):
        validate_schedule(1, (1.7,))
    with pytest.raises(ValueError, match="has 1 times"):
        validate_schedule(2, (1.5,))
