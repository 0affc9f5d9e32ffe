"""Compile every Triton kernel as its wrapper would launch it on a Hopper GPU (sm_90), on a machine
without one, and report each compiled variant's registers, spills and shared memory.

    TRITON_INTERPRET=0 python -m tests.kernels.sm90_compile [--json out.json]

The interpreter that runs the kernel tests accepts code a GPU compiler refuses (a jitted function
reading a global that is not a constexpr, for one), and the wrappers take device-dependent paths
(bf16 dots, the hardware's float8 casts) that the CPU never launches. Here the wrappers run on
`meta` tensors, which hold no data and take the GPU's paths; each launch is caught before it
runs and compiled for sm_90 with Triton's own compiler and ptxas, then measured with cuobjdump.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)  # Hopper: H100, H200
_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8e4nv",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
}  # fmt: skip

Launch = tuple[JITFunction, dict[str, str], dict[str, Any], dict[str, Any]]


def _launch_of(fn: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Launch:
    """(kernel, signature, constexprs, options) of one launch, as Triton's compiler takes them."""
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    sig: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for p in fn.params:
        v = bound.get(p.name, p.default)
        if p.is_constexpr or v is None:
            sig[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return fn, sig, constexprs, options


def capture(call: Callable[[], Any]) -> list[Launch]:
    """The launches `call` makes, caught before they run."""
    caught: list[Launch] = []
    run = JITFunction.run

    def catch(self: JITFunction, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> None:
        caught.append(_launch_of(self, args, kwargs))

    JITFunction.run = catch  # type: ignore[method-assign]
    try:
        call()
    finally:
        JITFunction.run = run  # type: ignore[method-assign]
    return caught


def cases() -> list[tuple[str, Callable[[], Any]]]:
    """The wrappers' calls at the models' shapes (MNIST DiT, DiT-B/2 at batch 1 and 256, DiT-XL/2)
    and odd ones, in fp32, bf16 and fp16, on meta tensors."""
    from kernels import triton_ops as K

    def t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    out: list[tuple[str, Callable[[], Any]]] = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dt).removeprefix("torch.")
        for B, N, D in ((64, 49, 192), (256, 256, 768), (64, 256, 1152), (3, 49, 1023)):
            x, h, m = t(B, N, D, dtype=dt), t(B, N, D, dtype=dt), t(B, D, dtype=dt)
            out += [
                (f"adaln_norm {name} {D}", lambda x=x, m=m: K.adaln_norm(x, m, m)),
                (f"residual_adaln_norm {name} {D}",
                 lambda x=x, h=h, m=m: K.residual_adaln_norm(x, m, h, m, m)),
                (f"gated_residual {name} {D}", lambda x=x, h=h, m=m: K.gated_residual(x, m, h)),
                (f"adaln_norm_fp8 {name} {D}", lambda x=x, m=m: K.adaln_norm_fp8(x, m, m)),
                (f"residual_adaln_norm_fp8 {name} {D}",
                 lambda x=x, h=h, m=m: K.residual_adaln_norm_fp8(x, m, h, m, m)),
            ]  # fmt: skip
        shapes = [(64, 6, 49, 32), (1, 12, 256, 64), (256, 12, 256, 64), (32, 16, 256, 72), (1, 2, 130, 128)]
        if dt == torch.float32:  # served through torch on CUDA (kernels.backend_for): two checks
            shapes = [(64, 6, 49, 32), (32, 16, 256, 72)]
        for B, H, N, Dh in shapes:
            q, w = t(B, H, N, Dh, dtype=dt), t(Dh, dtype=dt)
            if dt == torch.float32:  # TF32 dots at both, IEEE at the small one (slow to compile)
                kw: list[dict[str, Any]] = [{"fp32_precision": "tf32"}] + ([{}] if Dh == 32 else [])
            else:
                kw = [{}, {"k_norm": "scores"}]
            for k in kw:
                out.append((f"attention {name} {(B, H, N, Dh)} {k}",
                            lambda q=q, w=w, k=k: K.attention(q, q, q, w, w, **k)))  # fmt: skip
        quant = ((65536, 768, False), (65536, 3072, True), (16384, 1152, False), (16384, 4608, True))
        for R, Kd, gelu in quant:
            x = t(R, Kd, dtype=dt)
            out.append((f"quantize_rows_fp8 {name} {Kd}{' gelu' if gelu else ''}",
                        lambda x=x, g=gelu: K.quantize_rows_fp8(x, gelu=g)))  # fmt: skip
    return out


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack bytes per thread (where ptxas spills registers), by cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True)
    text = res.stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", text))
    return {"registers": int(found["REG"]), "spill_bytes": int(found["STACK"])}


def compile_all() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    rows = []
    for label, call in cases():
        for fn, sig, constexprs, options in capture(call):
            shown = {k: str(v) for k, v in constexprs.items()}
            key = json.dumps([fn.__name__, sig, shown, options], sort_keys=True)
            if key in seen:
                continue
            row: dict[str, Any] = {"case": label, "kernel": fn.__name__, "constexprs": shown, **options}
            t0 = time.monotonic()
            try:
                compiled = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options=options)
                row.update(resources(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared)
            except Exception as e:  # record every failure, not just the first
                row["error"] = f"{type(e).__name__}: {e}"[-600:]
            row["compile_s"] = round(time.monotonic() - t0, 2)
            seen[key] = row
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("set TRITON_INTERPRET=0: the interpreter replaces the compiler")
    rows = compile_all()
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
