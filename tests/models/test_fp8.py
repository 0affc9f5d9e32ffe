"""float8 serving (models/fp8.py) on the CPU, whose float8 matmuls compute what a GPU's do up to
the order of accumulation: the quantization's error bound, the swapped layers, the network and
the engine at --dtype float8."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from kernels.reference import E4M3_MAX
from kernels.reference import quantize_rows_fp8 as quantize_rows
from models.fp8 import E4M3, Fp8Linear, quantize_blocks


def test_rows_quantize_within_half_a_step_of_e4m3() -> None:
    """Each row is scaled to e4m3's range: every value comes back within half a step of its
    own binade (3 mantissa bits: 1/16 of its magnitude) or of the smallest normal's; a row of
    zeros comes back as zeros, not NaN."""
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]
    x[3] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == E4M3 and s.shape == (8, 1) and s.dtype == torch.float32
    back = q.float() * s
    assert torch.isfinite(back).all() and back[3].abs().max() == 0
    assert (q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5, 6, 7]] == E4M3_MAX).all()  # whole range used
    bound = x.abs() / 16 + s * 2.0**-10  # relative half step, or the subnormals' absolute one
    assert ((back - x).abs() <= bound + 1e-12).all()


def test_a_float8_linear_computes_the_linear() -> None:
    """[..., K] in, [..., N] bf16 out: the matmul of the per-token quantized input with the
    per-channel quantized weight (to bf16's rounding), plus the bias; within e4m3's rounding of
    the fp32 linear, and not the unquantized product."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    y = Fp8Linear(lin)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 48)
    qx, sx = quantize_rows(x.bfloat16().reshape(10, 64))
    qw, sw = quantize_rows(lin.weight.detach())
    dequantized = (qx.float() * sx) @ (qw.float() * sw).t() + lin.bias.detach()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(y.reshape(10, 48), dequantized) < 0.005
    assert 0.005 < rel(y, lin(x)) < 0.06
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(nn.Linear(40, 48))


def test_a_float8_linear_moves_but_is_not_cast() -> None:
    f = Fp8Linear(nn.Linear(32, 16))
    f.to("cpu")
    assert f.weight.dtype == E4M3
    with pytest.raises(TypeError, match="cast"):
        f.to(torch.float32)


def test_a_dit_serves_its_block_linears_in_float8() -> None:
    """cast_network(float8): every block's qkv, proj and MLP linears become float8 ones, the
    rest bf16; the network's output stays near fp32's; a non-DiT network refuses."""
    from models.consistency import TrigFlow
    from models.edm import EDMConsistency
    from models.placeholder import random_dit

    net = random_dit("tiny")
    fp32 = TrigFlow(net)
    fp8 = copy.deepcopy(fp32).cast_network(E4M3)
    blocks = list(fp8.net.blocks)
    assert len(blocks) == 2
    for blk in blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp[0], blk.mlp[2]):
            assert isinstance(lin, Fp8Linear)
        assert blk.ada.weight.dtype == torch.bfloat16
    assert fp8.compute_dtype == torch.bfloat16
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.arange(4)
    with torch.inference_mode():
        ref, out = fp32.velocity(x, t, y), fp8.velocity(x, t, y)
    assert out.dtype == torch.float32
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.1
    assert quantize_blocks(nn.Sequential(nn.Linear(16, 16))) == 0
    with pytest.raises(ValueError, match="DiT"):
        TrigFlow(nn.Sequential(nn.Linear(16, 16))).cast_network(E4M3)
    with pytest.raises(ValueError, match="DiT"):
        EDMConsistency.__new__(EDMConsistency).cast_network(E4M3)


def test_the_engine_serves_float8_on_the_cpu(tiny_ckpt: Path) -> None:
    """--dtype float8 on the CPU: the engine's batches come from the float8 network; --dtype
    auto stays float32 there."""
    from server.engine import Engine, compute_dtype
    from server.metrics import Metrics
    from server.settings import Settings

    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("float8", torch.device("cpu")) == E4M3
    e = Engine(Settings(checkpoint=str(tiny_ckpt), buckets=[1, 4], dtype="float8"), Metrics())
    try:
        e.warmup()
        blk = e.get().model.net.blocks[0]  # type: ignore[attr-defined]
        assert isinstance(blk.mlp[0], Fp8Linear)
        images = e.call(e.run_batch, 2, [3, 5], [1, 2])
        assert images.shape == (2, 28, 28, 1)
    finally:
        e.close()


def test_a_gelu_float8_linear_computes_the_linear_of_the_gelu() -> None:
    """gelu=True: y = gelu(x) Wᵀ + b (the second MLP linear, fed the first's output unactivated),
    within e4m3's rounding of the fp32 product."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 64) * 2
    y = Fp8Linear(lin, gelu=True)(x.bfloat16()).float()
    ref = lin(torch.nn.functional.gelu(x, approximate="tanh"))
    assert ((y - ref).norm() / ref.norm()).item() < 0.06
    assert ((Fp8Linear(lin)(x.bfloat16()).float() - ref).norm() / ref.norm()).item() > 0.2


def test_float8_blocks_take_their_norms_in_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every norm before a float8 linear hands it e4m3 (`kernels.adaln_norm_fp8` and
    `residual_adaln_norm_fp8`), the final layer's norm stays bf16, and the linears quantize only
    the attention output and the MLP's GELU input themselves: in a 2-block DiT, 1 + 3 float8
    norms, 1 plain one, 4 quantizations."""
    from collections import Counter

    import kernels
    from models.consistency import TrigFlow
    from models.placeholder import random_dit

    calls: Counter[str] = Counter()
    for name in ("adaln_norm", "residual_adaln_norm", "adaln_norm_fp8", "residual_adaln_norm_fp8",
                 "quantize_rows_fp8"):  # fmt: skip
        real = getattr(kernels, name)

        def counted(*a: object, _real: object = real, _name: str = name, **k: object) -> object:
            calls[_name] += 1
            return _real(*a, **k)  # type: ignore[operator]

        monkeypatch.setattr(kernels, name, counted)
    model = TrigFlow(random_dit("tiny")).cast_network(E4M3)
    assert len(model.net.blocks) == 2
    with torch.inference_mode():
        out = model.velocity(torch.randn(2, 1, 28, 28), torch.rand(2), torch.arange(2))
    assert torch.isfinite(out).all()
    assert calls == {"adaln_norm_fp8": 1, "residual_adaln_norm_fp8": 3, "residual_adaln_norm": 1,
                     "quantize_rows_fp8": 4}  # fmt: skip
