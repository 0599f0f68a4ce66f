"""Flash attention in Triton: a tiled online-softmax forward and a recomputing backward.

The torch path materialises the (Sq, Sk) score matrix of every head. These kernels keep scores
in on-chip tiles, save only the log-sum-exp of each query row, and recompute the probabilities
from it in backward, so memory is linear in the sequence length.

Semantics match `attention_torch` (see `build_mask`): causal masks are aligned bottom-right
when Sq < Sk; `doc_ids` (B, Sk) keeps queries inside their packed document; `key_padding_mask`
(B, Sk) is False at padding keys; every query always keeps its own position.

Handled in the kernels: causal and non-causal, grouped-query and multi-query heads (query head
h reads kv head h // (Hq // Hkv); K/V are never repeated, and the dK/dV program of a kv head
loops over its query heads), head dims up to 128 (padded to a power of two with masks), any
sequence length, doc_ids and key_padding_mask, fp32/fp16/bf16 inputs with fp32 math (tiles are
upcast on load and downcast on store, which also keeps the Triton CPU interpreter exact).

Falls back to `attention_torch`: dropout_p > 0 (the kernels have no RNG, and backward would
have to regenerate the forward's dropout mask), head dims above 128 (the fp32 tiles would not
fit in registers), and dtypes other than fp32/fp16/bf16 (the kernels accumulate in fp32, which
would silently lose fp64 precision).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.attention_torch import attention_torch, check_attention_args
from tessera.kernels.dispatch import register
from tessera.kernels.triton_common import round_cast

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_tile(ptr, rows, offs_d, n_rows, D):
    """Rows `rows` of a contiguous (n_rows, D) matrix as fp32, zero outside it."""
    mask = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, tile, rows, offs_d, n_rows, D):
    """Store an fp32 tile in the pointer's dtype, rounding to nearest even."""
    mask = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    tl.store(ptr + rows[:, None] * D + offs_d[None, :], round_cast(tile, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _keep(m, n, b, Sq, Sk, DOC, KPM, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr):
    """Where query row m may attend key n, as `build_mask` does; m and n are index blocks
    shaped to broadcast, so one helper serves both the (M, N) and the transposed (N, M) tiles."""
    pos = m + (Sk - Sq)
    row_ok = m < Sq
    keep = row_ok & (n < Sk)
    if CAUSAL:
        keep = keep & (n <= pos)
    if HAS_DOC:
        doc_q = tl.load(DOC + b * Sk + pos, mask=row_ok & (pos >= 0), other=-1)
        doc_k = tl.load(DOC + b * Sk + n, mask=n < Sk, other=-2)
        keep = keep & (doc_q == doc_k)
    if HAS_KPM:
        keep = keep & (tl.load(KPM + b * Sk + n, mask=n < Sk, other=0) != 0)
    return keep | (row_ok & (n == pos))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOC, KPM, sm_scale, Hq, Sq, Sk, D, GROUP,
                CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """One (query tile, batch*head) program: stream key tiles with a running max and sum."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // Hq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = bh.to(tl.int64) * Sq * D
    kv_base = (bh // GROUP).to(tl.int64) * Sk * D
    # Scores in base-2 units, so exp2 (the hardware's native exponential) gives the softmax.
    q = _load_tile(Q + q_base, offs_m, offs_d, Sq, D) * (sm_scale * LOG2E)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M + Sk - Sq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, offs_d, Sk, D)
        v = _load_tile(V + kv_base, offs_n, offs_d, Sk, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        keep = _keep(offs_m[:, None], offs_n[None, :], b, Sq, Sk, DOC, KPM, CAUSAL, HAS_DOC, HAS_KPM)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet (e.g. an earlier document) must not produce inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    # Only rows past Sq (or every row before the first key, if causal with Sq > Sk) see no key:
    # give them 0 rather than 0/0.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    _store_tile(O + q_base, acc / l_i[:, None], offs_m, offs_d, Sq, D)
    tl.store(LSE + bh * Sq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Sq)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, Sq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward term shared by every key of a row."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * Sq * D
    o = _load_tile(O + base, offs_m, offs_d, Sq, D)
    do = _load_tile(DO + base, offs_m, offs_d, Sq, D)
    tl.store(DELTA + bh * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC, KPM, sm_scale, Hq, Sq, Sk, D, GROUP,
                     CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One (key tile, batch*kv head) program. It loops over all query heads of its group, so
    grouped heads are summed in fp32 registers with no atomics and no repeated K/V."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1)
    b = kv_bh * GROUP // Hq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_base = kv_bh.to(tl.int64) * Sk * D
    k = _load_tile(K + kv_base, offs_n, offs_d, Sk, D)
    v = _load_tile(V + kv_base, offs_n, offs_d, Sk, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, start_n - (Sk - Sq))  # first query whose position reaches this tile
    for g in range(0, GROUP):
        bh = kv_bh * GROUP + g
        q_base = bh.to(tl.int64) * Sq * D
        for start_m in range(lo, Sq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(Q + q_base, offs_m, offs_d, Sq, D)
            do = _load_tile(DO + q_base, offs_m, offs_d, Sq, D)
            lse = tl.load(LSE + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
            delta = tl.load(DELTA + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
            # Transposed tiles (keys x queries) so dK and dV accumulate as plain row blocks.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            keep = _keep(offs_m[None, :], offs_n[:, None], b, Sq, Sk, DOC, KPM, CAUSAL, HAS_DOC, HAS_KPM)
            p_t = tl.where(keep, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t, do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dk += tl.dot(p_t * (dp_t - delta[None, :]), q, input_precision=PRECISION)
    _store_tile(DK + kv_base, dk * sm_scale, offs_n, offs_d, Sk, D)
    _store_tile(DV + kv_base, dv, offs_n, offs_d, Sk, D)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, KPM, sm_scale, Hq, Sq, Sk, D, GROUP,
                   CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One (query tile, batch*head) program: dQ = sum over key tiles of dS K, from the LSE."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // Hq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = bh.to(tl.int64) * Sq * D
    kv_base = (bh // GROUP).to(tl.int64) * Sk * D
    q = _load_tile(Q + q_base, offs_m, offs_d, Sq, D)
    do = _load_tile(DO + q_base, offs_m, offs_d, Sq, D)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M + Sk - Sq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, offs_d, Sk, D)
        v = _load_tile(V + kv_base, offs_n, offs_d, Sk, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = _keep(offs_m[:, None], offs_n[None, :], b, Sq, Sk, DOC, KPM, CAUSAL, HAS_DOC, HAS_KPM)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq += tl.dot(p * (dp - delta[:, None]), k, input_precision=PRECISION)
    _store_tile(DQ + q_base, dq * sm_scale, offs_m, offs_d, Sq, D)


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): one fixed config (autotune does not run under the
    interpreter); smaller key tiles for wide heads keep the fp32 tiles in registers."""
    block_d = max(16, triton.next_power_of_2(d))
    return (64, 64, block_d) if block_d <= 64 else (64, 32, block_d)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, doc_ids, key_padding_mask):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        doc = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
        kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
        block_m, block_n, block_d = _blocks(d)
        # fp32 inputs get exact fp32 dots; fp16/bf16 values are exact in tf32, so tensor cores lose nothing.
        meta = dict(CAUSAL=bool(causal), HAS_DOC=doc is not None, HAS_KPM=kpm is not None,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        o = torch.empty_like(q)
        lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
        masks = (q if doc is None else doc, q if kpm is None else kpm)
        _fwd_kernel[(triton.cdiv(sq, block_m), b * hq)](
            q, k, v, o, lse, *masks, d**-0.5, hq, sq, sk, d, hq // hkv, **meta)
        ctx.save_for_backward(q, k, v, o, lse, doc, kpm)
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc, kpm = ctx.saved_tensors
        meta = ctx.meta
        do = do.contiguous()
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        args = (d**-0.5, hq, sq, sk, d, hq // hkv)
        masks = (q if doc is None else doc, q if kpm is None else kpm)
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(sq, meta["BLOCK_M"]), b * hq)](
            o, do, delta, sq, d, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _bwd_dkdv_kernel[(triton.cdiv(sk, meta["BLOCK_N"]), b * hkv)](
            q, k, v, do, lse, delta, dk, dv, *masks, *args, **meta)
        _bwd_dq_kernel[(triton.cdiv(sq, meta["BLOCK_M"]), b * hq)](
            q, k, v, do, lse, delta, dq, *masks, *args, **meta)
        return dq, dk, dv, None, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by the Triton kernels; same contract as `attention_torch`."""
    check_attention_args(q, k, doc_ids)
    if dropout_p > 0 or q.shape[-1] > MAX_HEAD_DIM or q.dtype not in KERNEL_DTYPES:
        return attention_torch(q, k, v, causal, doc_ids, key_padding_mask, dropout_p)
    return _FlashAttention.apply(q, k, v, causal, doc_ids, key_padding_mask)


register("attention", "triton", attention_triton)
