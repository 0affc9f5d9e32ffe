"""Every Triton kernel against a high-precision reference, on the shapes the models run.

Error is ‖out − ref‖ / ‖ref‖ with ref = the torch reference on the same (rounded) inputs
upcast to float64 (its norms compute their statistics in fp32 whatever the input), so it
measures the kernel's arithmetic, not the rounding of its inputs. A kernel passes
when its error is at most 2× torch's own in that dtype plus a floor (flash-attention's rule);
the fp32 attention also runs with TF32 dots, held to a TF32 bound instead. Outputs are
pre-filled with NaN where the kernel takes `out=`, so an unwritten element fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kernels import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# floors of relative error: fp32 arithmetic, and the unit roundoff of each 16-bit format
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
TF32_BOUND = 4e-3  # 10-bit mantissa: unit roundoff 4.9e-4, dots of 32-128 terms stay well under this

NORM_SHAPES = [(4, 49, 192), (8, 256, 768), (4, 256, 1152), (3, 49, 1023)]
# (B, H, N, Dh): MNIST DiT, DiT-B/2, DiT-XL/2, odd sizes, the largest head dim, a long sequence
ATTN_SHAPES = [(4, 6, 49, 32), (2, 12, 256, 64), (2, 16, 256, 72), (1, 2, 77, 24), (1, 2, 130, 128),
               (1, 4, 1024, 64)]  # fmt: skip
# (rows, K, N) of the MLP's first layer: MNIST DiT, DiT-B/2, DiT-XL/2 (rows = B·tokens), odd sizes
LINEAR_SHAPES = [(4 * 49, 192, 768), (8 * 256, 768, 3072), (4 * 256, 1152, 4608), (77, 200, 136)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _case(
    op: str, dtype: torch.dtype, shape: tuple[int, ...], kernel: Callable[[], Any], lowp: Callable[[], Any],
    ref64: Callable[[], Any], bound: float | None = None, note: str = "",
) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {"op": op, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
    if note:
        row["note"] = note
    try:
        k, t, r = kernel(), lowp(), ref64()
        ks, ts, rs = (x if isinstance(x, tuple) else (x,) for x in (k, t, r))
        row["kernel_err"] = max(rel_err(a, c) for a, c in zip(ks, rs))
        row["torch_err"] = max(rel_err(b, c) for b, c in zip(ts, rs))
        row["bound"] = bound if bound is not None else 2 * row["torch_err"] + FLOOR[dtype]
        row["ok"] = row["kernel_err"] <= row["bound"]
    except Exception as e:  # one failing case must not hide the others
        row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"[:500]
    return row


def _norm_cases(
    dt: torch.dtype, x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, sh: torch.Tensor, sc: torch.Tensor
) -> list[dict[str, Any]]:
    """The three norm kernels on one input set ([B, N, D] x, h; [B, D] gate, shift, scale)."""
    from kernels import triton_ops as K

    d64 = [t.double() for t in (x, gate, h, sh, sc)]
    shape = tuple(x.shape)

    def poisoned() -> torch.Tensor:
        return torch.full_like(x, float("nan"))

    return [
        _case("adaln_norm", dt, shape, lambda: K.adaln_norm(x, sh, sc, out=poisoned()),
              lambda: reference.adaln_norm(x, sh, sc), lambda: reference.adaln_norm(d64[0], d64[3], d64[4])),
        _case("residual_adaln_norm", dt, shape, lambda: K.residual_adaln_norm(x, gate, h, sh, sc),
              lambda: reference.residual_adaln_norm(x, gate, h, sh, sc),
              lambda: reference.residual_adaln_norm(d64[0], d64[1], d64[2], d64[3], d64[4])),
        _case("gated_residual", dt, shape, lambda: K.gated_residual(x, gate, h, out=poisoned()),
              lambda: reference.gated_residual(x, gate, h),
              lambda: reference.gated_residual(d64[0], d64[1], d64[2])),
    ]  # fmt: skip


def _attention_cases(
    dt: torch.dtype, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor
) -> list[dict[str, Any]]:
    """The attention kernel (QK-norm weight w for both) on one input set, with K's norm on the
    keys (the default) and on the scores; fp32 also with TF32 dots, against TF32_BOUND."""
    from kernels import triton_ops as K

    B, H, N, Dh = q.shape
    q64, k64, v64, w64 = (t.double() for t in (q, k, v, w))

    def attn(prec: str, k_norm: str = "keys") -> torch.Tensor:
        o = torch.full((B, N, H, Dh), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
        return K.attention(q, k, v, w, w, out=o, fp32_precision=prec, k_norm=k_norm)

    def ref64() -> torch.Tensor:
        return reference.attention(q64, k64, v64, w64, w64)

    def lowp() -> torch.Tensor:
        return reference.attention(q, k, v, w, w)

    rows = [_case("attention", dt, (B, H, N, Dh), lambda: attn("ieee"), lowp, ref64)]
    rows.append(_case("attention", dt, (B, H, N, Dh), lambda: attn("ieee", "scores"), lowp, ref64,
                      note="k_norm=scores"))  # fmt: skip
    if dt == torch.float32:
        rows.append(_case("attention", dt, (B, H, N, Dh), lambda: attn("tf32"), lowp, ref64,
                          bound=TF32_BOUND, note="fp32_precision=tf32"))  # fmt: skip
    return rows


def _linear_gelu_case(dt: torch.dtype, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """cuBLASLt's bias+GELU epilogue against the reference's two ops. The epilogue rounds once,
    the reference after the matmul too, so the fused op should be the nearer of the two; an
    epilogue with the exact (erf) GELU instead of the tanh form fails the fp32 bound."""
    from kernels import triton_ops as K

    x64, w64, b64 = (t.double() for t in (x, w, b))
    shape = (x.shape[0], x.shape[1], w.shape[0])
    return _case(
        "linear_gelu", dt, shape, lambda: K.linear_gelu(x, w, b), lambda: reference.linear_gelu(x, w, b),
        lambda: reference.linear_gelu(x64, w64, b64),
    )  # fmt: skip


# The GELU's exp and torch's tanh differ in the last bits, which moves a rare value across a bf16
# and then an e4m3 rounding boundary; without the GELU the kernel gives the reference's bits
FP8_GELU_BOUND = 1e-3


def _fp8_quant_case(dt: torch.dtype, x: torch.Tensor, gelu: bool = False) -> dict[str, Any]:
    """Per-row float8 quantization (of gelu(x) with `gelu`), compared dequantized (q · scale) with
    the reference's: exactly, or within FP8_GELU_BOUND with the GELU."""
    from kernels import triton_ops as K

    def dequantized(qs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return qs[0].float() * qs[1]

    return _case(
        "quantize_rows_fp8", dt, tuple(x.shape), lambda: dequantized(K.quantize_rows_fp8(x, gelu)),
        lambda: dequantized(reference.quantize_rows_fp8(x, gelu)),
        lambda: dequantized(reference.quantize_rows_fp8(x, gelu)).double(),
        bound=FP8_GELU_BOUND if gelu else 0.0, note="gelu" if gelu else "",
    )  # fmt: skip


def check(device: str = "cuda", seed: int = 0) -> list[dict[str, Any]]:

    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g)

    rows = []
    for dt in DTYPES:
        for B, N, D in NORM_SHAPES:
            x, h = rnd(B, N, D).to(dt), rnd(B, N, D).to(dt)
            gate, sh, sc = (rnd(B, D).to(dt) for _ in range(3))
            rows += _norm_cases(dt, x, gate, h, sh, sc)
        for B, H, N, Dh in ATTN_SHAPES:
            qkv = rnd(B, N, 3, H, Dh).to(dt).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, Dh], strided views
            w = (torch.rand(Dh, device=device, generator=g) + 0.5).to(dt)
            rows += _attention_cases(dt, qkv[0], qkv[1], qkv[2], w)
        for M, Kd, N in LINEAR_SHAPES:
            x, w, b = rnd(M, Kd).to(dt), (rnd(N, Kd) / Kd**0.5).to(dt), rnd(N).to(dt)
            rows.append(_linear_gelu_case(dt, x, w, b))
            rows.append(_fp8_quant_case(dt, x))
            rows.append(_fp8_quant_case(dt, x, gelu=True))
    return rows
