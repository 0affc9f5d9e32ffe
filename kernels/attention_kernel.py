"""Flash-attention forward for the DiT: non-causal, QK-RMSNorm fused, any N, head dims 16-128.

Per (batch*head, block of BLOCK_M queries): normalize q (RMS over the real head dim, times its
weight) and fold in softmax's 1/sqrt(Dh) and log2(e) so the loop can use exp2; then stream K/V
in blocks of BLOCK_N with the online softmax of FlashAttention (Dao et al. 2022; Triton
tutorial 06): running max m, running sum l, and the fp32 accumulator rescaled by
exp2(m_old − m_new). Tails past N are masked to −inf (keys) or not stored (queries); head dims
that are not a power of two are zero-padded to BLOCK_D, which leaves dot products and the RMS
(divided by the real Dh) unchanged. Shapes that fill every block (EVEN) skip the masks.

K's RMSNorm, two ways (`k_norm`):
- 'keys': each K block is normalized in registers before the QK dot, as the reference does.
- 'scores': q·(k/rms_k ⊙ w) = ((q ⊙ w)·k)/rms_k, so K's weight is folded into q once and each
  score column is scaled by its key's 1/rms_k after the dot. The raw K block goes to the dot as
  loaded (on Hopper the dot's operands are read from shared memory, and a block rewritten in
  registers has to be stored back there first); its sum of squares is a row reduction beside it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.launch import interpreted


@triton.jit
def _rms(x, w, Dh, eps):
    # x: [BLOCK, BLOCK_D] fp32 with zero padding; w: [BLOCK_D] fp32
    ms = tl.sum(x * x, axis=1) / Dh
    return x * (1.0 / tl.sqrt(ms + eps))[:, None] * w[None, :]


@triton.jit
def _attention_kernel(
    Q,
    K,
    V,
    QW,
    KW,
    Out,
    H,
    N,
    # The head dim and the head strides are compile-time constants: for DiT-XL/2's head dim of
    # 72 (in blocks of 128) the mask and each head's offset are then known to be multiples of 8
    # elements, so its loads can be vector loads. As runtime values they are not known to be:
    # Triton marks integer arguments only when they are multiples of 16.
    Dh: tl.constexpr,
    sq_b,
    sq_h: tl.constexpr,
    sq_n,
    sk_b,
    sk_h: tl.constexpr,
    sk_n,
    sv_b,
    sv_h: tl.constexpr,
    sv_n,
    so_b,
    so_h: tl.constexpr,
    so_n,
    qk_scale,
    eps,
    QK_NORM: tl.constexpr,
    K_SCALE: tl.constexpr,  # k_norm='scores'
    EVEN: tl.constexpr,  # N a multiple of BLOCK_M and BLOCK_N, and Dh == BLOCK_D: no masks
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # 64-bit batch and head offsets: b·stride passes 2^31 elements before any row offset does
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < Dh
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :]
    if EVEN:
        q = tl.load(q_ptrs).to(tl.float32)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < N) & d_mask[None, :], other=0.0).to(tl.float32)
    if QK_NORM:
        qw = tl.load(QW + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        kw = tl.load(KW + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        q = _rms(q, qw, Dh, eps)
        if K_SCALE:
            q = q * kw[None, :]
    q = (q * qk_scale).to(DOT_DTYPE)  # qk_scale = log2(e)/sqrt(Dh)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :]
        v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :]
        if EVEN:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs).to(DOT_DTYPE)
        else:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        if QK_NORM and not K_SCALE:
            k = _rms(k.to(tl.float32), kw, Dh, eps)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], log2 domain
        if QK_NORM and K_SCALE:
            kf = k.to(tl.float32)
            s = s * (1.0 / tl.sqrt(tl.sum(kf * kf, axis=1) / Dh + eps))[None, :]
        if not EVEN:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = Out + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :]
    if EVEN:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N) & d_mask[None, :])


_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100 (Triton's "hardware limit")


def smem_bytes(block_m: int, block_n: int, block_d: int, stages: int, itemsize: int) -> int:
    """Shared memory the kernel asks for: the q block, and K and V blocks for each pipeline
    stage. Triton counted 262144 for 128 x 64 x 128 fp32 blocks at 3 stages on an H100, which
    this gives exactly."""
    return (block_m + 2 * stages * block_n) * block_d * itemsize


def _blocks(N: int, Dh: int, itemsize: int = 2, heads: int = 1) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for `heads` (batch x heads) sequences
    of N tokens. tl.dot needs every block dim >= 16.

    64 x 64 blocks, 4 warps, 3 stages, whatever the head dim (DiT-XL/2's 72 pads to 128): with
    the head dim a compile-time constant this was the fastest of the block sweep's choices at
    DiT-XL/2's shape on an H200 (`bench.gpu_check` part asweep; docs/performance.md), ahead of
    128 x 64 blocks with 8 warps. Head dims up to 64 on a grid that still has 1,024 programs or
    more with 128-query blocks (DiT-B/2 from batch 64 up): 128 x 128 blocks, the sweep's fastest
    at DiT-B/2's batch 128; at batch 1 those leave most SMs idle. Shared memory is checked
    against the limit; fp32 falls back to 64 queries and 2 stages if it is over.
    """
    block_d = max(16, triton.next_power_of_2(Dh))
    block_n = block_m = max(16, min(64, triton.next_power_of_2(N)))
    warps, stages = 4, 3
    if block_d <= 64 and N >= 128 and heads * triton.cdiv(N, 128) >= 1024:
        block_m = block_n = 128
    if smem_bytes(block_m, block_n, block_d, stages, itemsize) > SMEM_LIMIT:
        block_m, block_n, stages = min(block_m, 64), min(block_n, 64), 2
    return block_m, block_n, block_d, warps, stages


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    fp32_precision: str = "ieee",
    config: tuple[int, int, int, int] | None = None,
    k_norm: str = "keys",
) -> torch.Tensor:
    """q, k, v: [B, H, N, Dh] (any strides, last dim contiguous) -> [B, H, N, Dh].

    fp32_precision: how fp32 inputs enter the two dots. 'ieee' (the default) keeps fp32 serving
    fp32; 'tf32' runs them on the tensor cores with a 10-bit mantissa (relative error ~1e-3),
    Triton's own default and what an fp32 `tl.dot` silently does on NVIDIA GPUs. Ignored for
    bf16/fp16, which always use the tensor cores.
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the default choice (benchmarks).
    k_norm: where K's RMSNorm is applied, 'keys' (the default) or 'scores' (the module
    docstring); the same result up to rounding. `kernels.bench` times both.

    The default output is a [B, H, N, Dh] view of a contiguous [B, N, H, Dh] buffer, so the
    caller's transpose(1, 2).reshape(B, N, H*Dh) costs nothing.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share a [B, H, N, Dh] shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("QK-norm needs both q_weight and k_weight")
    B, H, N, Dh = q.shape
    if not 1 <= Dh <= 128:
        raise ValueError(f"head dim {Dh} outside 1..128")
    if (
        q.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise TypeError(f"q, k, v need one dtype of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = out if out is not None else torch.empty((B, N, H, Dh), dtype=q.dtype, device=q.device).transpose(1, 2)
    block_m, block_n, block_d, warps, n_stages = _blocks(N, Dh, q.element_size(), B * H)
    if config is not None:
        block_m, block_n, warps, n_stages = config
    qk_norm = q_weight is not None
    if k_norm not in ("keys", "scores"):
        raise ValueError(f"k_norm must be 'keys' or 'scores', got {k_norm!r}")
    even = N % block_m == 0 and N % block_n == 0 and Dh == block_d
    qw = q_weight if qk_norm else q
    kw = k_weight if qk_norm else q
    # Dots run in the input dtype (tensor cores); the CPU interpreter's bf16 dot is wrong (numpy
    # has no bf16), so there bf16 operands are upcast to fp32 — loads and stores stay bf16.
    dot_dtype = _DOT_DTYPES[q.dtype]
    if q.dtype == torch.bfloat16 and interpreted(q):
        dot_dtype = tl.float32
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    precision = fp32_precision if dot_dtype == tl.float32 else "tf32"  # "tf32" = Triton's default
    grid = (triton.cdiv(N, block_m), B * H)
    _attention_kernel[grid](
        q,
        k,
        v,
        qw,
        kw,
        o,
        H,
        N,
        Dh,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        math.log2(math.e) / math.sqrt(Dh),
        eps,
        QK_NORM=qk_norm,
        K_SCALE=k_norm == "scores",
        EVEN=even,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=n_stages,
    )
    return o
