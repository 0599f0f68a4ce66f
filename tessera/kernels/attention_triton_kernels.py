"""The Triton flash-attention kernels (forward, delta, dK/dV, dQ) and their tuning lists.

Tensor cores: Q/K/V/dO tiles stay in the input dtype, P and dS are cast to it before each
`tl.dot`, and every accumulator is fp32, so on Hopper the dots are bf16/fp16 wgmma. fp32 inputs
use exact ("ieee") fp32 dots on smaller tiles.

Work skipping: a causal query tile first visits the key tiles it sees entirely (no mask math),
then the tiles across its diagonal (masked); tiles past the diagonal are never loaded. With
`doc_ids`, a tile pair whose document-id ranges do not meet is skipped (exact for any labelling;
packed documents labelled in order skip all but the band around each document). A sliding window
W (WINDOWED) also drops the tiles entirely older than W keys, and masks the tiles across the band's
lower edge like those across the diagonal, in the forward and in both backward kernels.

Layout: q/o/dq (B, Hq, S, D) and k/v (B, Hkv, S, D) contiguous; batch*head is grid axis 0 (axes
1 and 2 are limited to 65535) and every per-head base offset is int64. Masks arrive as two int32
document rows (B or 1, Sk), DOC for queries and KDOC for keys (padding keys carry an id no query
has), read with a batch stride of 0 when one row serves the whole batch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tessera.kernels.triton_common import INTERPRET, dot, round_cast

# A module global inside @triton.jit must be a constexpr: the compiler rejects plain floats.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
INT32_MAX: tl.constexpr = tl.constexpr(2147483647)


def _configs(entries):
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter would run
    every candidate, so it gets the first only."""
    entries = entries[:1] if INTERPRET else entries
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


# From Triton's fused-attention tutorial and FlashAttention-2's tiles, kept to those that compile
# without spills for sm_90 and sm_80 at D=64 and D=128 (tests/test_kernels_compile.py checks them).
# Forward and dQ: 128-row query tiles (two m64 wgmma per warpgroup) over 64-key tiles.
FWD_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3)])
DQ_CONFIGS = _configs([(128, 64, 8, 2), (64, 64, 4, 2)])
DQ_MASKED_WIDE = _configs([(128, 32, 8, 2), (64, 32, 4, 2)])  # masked, D > 64: the mask tiles' registers
# dK/dV: the program owns BLOCK_N keys, the M side of its dots (>= 64 for wgmma), holds K, V, dK
# and dV in registers, and walks short query tiles; the document masks need the shortest.
DKDV_CONFIGS = _configs([(32, 128, 8, 2), (16, 128, 8, 2)])
DKDV_MASKED_WIDE = _configs([(16, 128, 8, 2)])
# A sliding window at D > 64 adds the band's masks and bounds: 64-key programs keep dK/dV in registers.
DKDV_WINDOWED_WIDE = _configs([(32, 64, 8, 2), (16, 64, 8, 2)])
# fp32 tiles are twice the bytes and their dots run on CUDA cores: small tiles.
FP32_CONFIGS = _configs([(32, 32, 4, 2)])


def tuned(configs, masked_wide=None, windowed_wide=None):
    """triton.autotune over `configs` for 16-bit inputs, keyed by the variant; fp32 inputs take
    FP32_CONFIGS, windowed variants with D > 64 take `windowed_wide` and masked ones `masked_wide`
    when given."""
    def prune(candidates, named_args, **kwargs):
        if named_args["Q"].dtype.itemsize == 4:
            return FP32_CONFIGS
        if windowed_wide and kwargs["WINDOWED"] and kwargs["HEAD_DIM"] > 64:
            return windowed_wide
        if masked_wide and kwargs["MASKED"] and kwargs["HEAD_DIM"] > 64:
            return masked_wide
        return candidates

    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "MASKED", "WINDOWED"],
                           prune_configs_by={"early_config_prune": prune})


@triton.jit
def _load(base, rows, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a contiguous (n_rows, HEAD_DIM) matrix in its own dtype, zero outside it."""
    cols = tl.arange(0, BLOCK_D)
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (cols[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store(base, tile, rows, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store an fp32 tile in the pointer's dtype, rounding to nearest even."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * HEAD_DIM + cols[None, :], round_cast(tile, base.dtype.element_ty), mask=mask)


@triton.jit
def _doc_range(doc, ok):
    """(min, max) document id of a block's valid entries: two blocks meet only if these overlap."""
    return tl.min(tl.where(ok, doc, INT32_MAX)), tl.max(tl.where(ok, doc, -INT32_MAX))


@triton.jit
def _meets(q_lo, q_hi, k_lo, k_hi, start_m, start_n, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether a (query tile, key tile) pair can hold a visible score: their document ranges
    overlap, or the tile holds a query's own key (always kept)."""
    own = (start_n <= start_m + BLOCK_M - 1 + off) & (start_n + BLOCK_N - 1 >= start_m + off)
    return ((k_hi >= q_lo) & (k_lo <= q_hi)) | own


@triton.jit
def _key_docs(KDOC, offs_n, Sk, q_lo, q_hi, start_m, start_n, off, MASKED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(document ids, visit) of a key tile against a query tile (placeholders when unmasked)."""
    if MASKED:
        doc_k = tl.load(KDOC + offs_n, mask=offs_n < Sk, other=0)
        k_lo, k_hi = _doc_range(doc_k, offs_n < Sk)
        visit = _meets(q_lo, q_hi, k_lo, k_hi, start_m, start_n, off, BLOCK_M, BLOCK_N)
    else:
        doc_k, visit = offs_n, True
    return doc_k, visit


@triton.jit
def _keep(pos, n, doc_q, doc_k, Sk, WINDOW, DIAG: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
          WINDOWED: tl.constexpr):
    """Where the query at position `pos` may attend key `n`, as `attention_torch.build_mask` says;
    arguments are index blocks shaped to broadcast, so the (M, N) and transposed tiles share it.
    Padding keys carry a document id no query has (see `attention_triton`)."""
    keep = n < Sk
    if CAUSAL and DIAG:
        keep = keep & (n <= pos)
    if WINDOWED and DIAG:
        keep = keep & (n > pos - WINDOW)
    if MASKED:
        keep = (keep & (doc_q == doc_k)) | (n == pos)
    return keep


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, k_base, v_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m, pos, lo, hi, qk_scale, Sk, off,
               WINDOW, DIAG: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
               BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi); DIAG tiles apply the causal, window and bounds masks."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        doc_k, visit = _key_docs(KDOC, offs_n, Sk, q_lo, q_hi, start_m, start_n, off, MASKED,
                                        BLOCK_M, BLOCK_N)
        if visit:
            k = _load(k_base, offs_n, Sk, HEAD_DIM, BLOCK_D)
            s = dot(q, tl.trans(k), None, PRECISION) * qk_scale
            if DIAG or MASKED:
                keep = _keep(pos[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :], Sk, WINDOW,
                             DIAG, CAUSAL, MASKED, WINDOWED)
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet must not compute inf - inf.
            m_safe = m_new
            if DIAG or MASKED:
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load(v_base, offs_n, Sk, HEAD_DIM, BLOCK_D)
            acc = dot(round_cast(p, v.dtype), v, acc * alpha[:, None], PRECISION)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_docs(DOC, offs_m, Sq, off, MASKED: tl.constexpr):
    """Document ids of a query tile's positions and their range (placeholders when unmasked)."""
    if MASKED:
        ok = (offs_m < Sq) & (offs_m + off >= 0)
        doc_q = tl.load(DOC + offs_m + off, mask=ok, other=-1)
        q_lo, q_hi = _doc_range(doc_q, ok)
    else:
        doc_q, q_lo, q_hi = offs_m, 0, 0
    return doc_q, q_lo, q_hi


@triton.jit
def _key_split(start_m, Sk, off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, hi): key tiles [0, full) are fully visible to the query tile, [full, hi) need masks."""
    full = Sk // BLOCK_N * BLOCK_N
    hi = Sk
    if CAUSAL:
        full = tl.minimum(tl.maximum(start_m + off + 1, 0) // BLOCK_N * BLOCK_N, full)
        hi = tl.minimum(Sk, start_m + BLOCK_M + off)
    return full, hi


@triton.jit
def _window_split(start_m, off, WINDOW, full, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, band) of a query tile under a sliding window: key tiles before `lo` are older than every
    query's window, those in [lo, band) cross the window's edge (masked), [band, full) lie inside it."""
    lo = tl.maximum(start_m + off - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    band = tl.cdiv(tl.maximum(start_m + BLOCK_M + off - WINDOW, 0), BLOCK_N) * BLOCK_N
    return lo, tl.maximum(tl.minimum(band, full), lo)


@tuned(FWD_CONFIGS)
@triton.jit
def fwd_kernel(Q, K, V, O, LSE, DOC, KDOC, sm_scale, Hq, Sq, Sk, GROUP, doc_sb, kdoc_sb, WINDOW,
               HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
               PRECISION: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (batch*head, query tile) program; the last query tiles (the longest causal rows) run first."""
    bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = bh // Hq
    off = Sk - Sq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos = offs_m + off
    q_base = Q + bh.to(tl.int64) * Sq * HEAD_DIM
    kv_base = (bh // GROUP).to(tl.int64) * Sk * HEAD_DIM
    DOC += b.to(tl.int64) * doc_sb
    KDOC += b.to(tl.int64) * kdoc_sb
    doc_q, q_lo, q_hi = _query_docs(DOC, offs_m, Sq, off, MASKED)
    q = _load(q_base, offs_m, Sq, HEAD_DIM, BLOCK_D)
    qk_scale = sm_scale * LOG2E  # base-2 scores: exp2 is the hardware's native exponential
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _key_split(start_m, Sk, off, CAUSAL, BLOCK_M, BLOCK_N)
    lo = 0
    if WINDOWED:
        lo, band = _window_split(start_m, off, WINDOW, full, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, K + kv_base, V + kv_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m,
                                   pos, lo, band, qk_scale, Sk, off, WINDOW, True, CAUSAL, MASKED, WINDOWED, BLOCK_M,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION)
        lo = band
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, K + kv_base, V + kv_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m, pos,
                               lo, full, qk_scale, Sk, off, WINDOW, False, CAUSAL, MASKED, WINDOWED, BLOCK_M, BLOCK_N,
                               HEAD_DIM, BLOCK_D, PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, K + kv_base, V + kv_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m, pos,
                               full, hi, qk_scale, Sk, off, WINDOW, True, CAUSAL, MASKED, WINDOWED, BLOCK_M, BLOCK_N,
                               HEAD_DIM, BLOCK_D, PRECISION)
    # Rows past Sq, or causal rows before the first key (Sq > Sk), saw nothing: 0, not 0/0.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    _store(O + bh.to(tl.int64) * Sq * HEAD_DIM, acc / l_i[:, None], offs_m, Sq, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Sq)


@triton.jit
def delta_kernel(O, DO, DELTA, Sq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward term shared by every key of a row."""
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh.to(tl.int64) * Sq * HEAD_DIM
    o = _load(O + base, offs_m, Sq, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load(DO + base, offs_m, Sq, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit
def _dkdv_stage(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC, doc_k, k_lo, k_hi, start_n,
                offs_n, lo, hi, qk_scale, Sq, Sk, off, WINDOW, DIAG: tl.constexpr, CAUSAL: tl.constexpr,
                MASKED: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in transposed (keys x queries)
    tiles so both gradients are plain row blocks. Query rows past Sq load as zeros and add 0."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        doc_q, q_lo, q_hi = _query_docs(DOC, offs_m, Sq, off, MASKED)
        visit = True
        if MASKED:
            visit = _meets(q_lo, q_hi, k_lo, k_hi, start_m, start_n, off, BLOCK_M, BLOCK_N)
        if visit:
            q = _load(q_base, offs_m, Sq, HEAD_DIM, BLOCK_D)
            lse = tl.load(lse_base + offs_m, mask=offs_m < Sq, other=0.0)
            s_t = dot(k, tl.trans(q), None, PRECISION) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])
            if DIAG or MASKED:
                keep = _keep(offs_m[None, :] + off, offs_n[:, None], doc_q[None, :], doc_k[:, None],
                             Sk, WINDOW, DIAG, CAUSAL, MASKED, WINDOWED)
                p_t = tl.where(keep, p_t, 0.0)
            do = _load(do_base, offs_m, Sq, HEAD_DIM, BLOCK_D)
            dv = dot(round_cast(p_t, do.dtype), do, dv, PRECISION)
            delta = tl.load(delta_base + offs_m, mask=offs_m < Sq, other=0.0)
            dp_t = dot(v, tl.trans(do), None, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dot(round_cast(ds_t, q.dtype), q, dk, PRECISION)
    return dk, dv


@tuned(DKDV_CONFIGS, DKDV_MASKED_WIDE, DKDV_WINDOWED_WIDE)
@triton.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC, KDOC, sm_scale, Hq, Sq, Sk, GROUP, doc_sb, kdoc_sb, WINDOW,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
                PRECISION: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (batch*kv head, key tile) program. It walks every query head of its group, so grouped
    heads are summed in fp32 registers with no atomics and no repeated K/V."""
    kv_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = kv_bh * GROUP // Hq
    off = Sk - Sq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_base = kv_bh.to(tl.int64) * Sk * HEAD_DIM
    DOC += b.to(tl.int64) * doc_sb
    KDOC += b.to(tl.int64) * kdoc_sb
    k = _load(K + kv_base, offs_n, Sk, HEAD_DIM, BLOCK_D)
    v = _load(V + kv_base, offs_n, Sk, HEAD_DIM, BLOCK_D)
    doc_k, k_lo, k_hi = offs_n, 0, 0
    if MASKED:
        doc_k = tl.load(KDOC + offs_n, mask=offs_n < Sk, other=0)
        k_lo, k_hi = _doc_range(doc_k, offs_n < Sk)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    lo = 0
    full = 0
    if CAUSAL:  # queries before `lo` see none of these keys; from `full` on, all of them
        lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - off, lo), Sq)
        full = lo + tl.cdiv(full - lo, BLOCK_M) * BLOCK_M
    band = Sq  # queries in [full, band) see every key of the tile; those in [band, hi) its newest only
    hi = Sq
    if WINDOWED:
        band = tl.maximum(tl.minimum(tl.maximum(start_n + WINDOW - off, 0) // BLOCK_M * BLOCK_M, Sq), full)
        hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1 - off, Sq)
    for g in range(0, GROUP):
        bh = (kv_bh * GROUP + g).to(tl.int64)
        q_base, lse_base = Q + bh * Sq * HEAD_DIM, LSE + bh * Sq
        do_base, delta_base = DO + bh * Sq * HEAD_DIM, DELTA + bh * Sq
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC, doc_k, k_lo, k_hi,
                             start_n, offs_n, lo, full, qk_scale, Sq, Sk, off, WINDOW, True, CAUSAL, MASKED, WINDOWED,
                             BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC, doc_k, k_lo, k_hi,
                             start_n, offs_n, full, band, qk_scale, Sq, Sk, off, WINDOW, False, CAUSAL, MASKED,
                             WINDOWED, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION)
        if WINDOWED:
            dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC, doc_k, k_lo, k_hi,
                                 start_n, offs_n, band, hi, qk_scale, Sq, Sk, off, WINDOW, True, CAUSAL, MASKED,
                                 WINDOWED, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION)
    _store(DK + kv_base, dk * sm_scale, offs_n, Sk, HEAD_DIM, BLOCK_D)
    _store(DV + kv_base, dv, offs_n, Sk, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_stage(dq, q, do, lse, delta, k_base, v_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m, pos, lo, hi, qk_scale, Sk,
              off, WINDOW, DIAG: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
              BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ = sum over key tiles [lo, hi) of dS K, recomputing P from the LSE."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        doc_k, visit = _key_docs(KDOC, offs_n, Sk, q_lo, q_hi, start_m, start_n, off, MASKED,
                                        BLOCK_M, BLOCK_N)
        if visit:
            k = _load(k_base, offs_n, Sk, HEAD_DIM, BLOCK_D)
            s = dot(q, tl.trans(k), None, PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if DIAG or MASKED:
                keep = _keep(pos[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :], Sk, WINDOW,
                             DIAG, CAUSAL, MASKED, WINDOWED)
                p = tl.where(keep, p, 0.0)
            v = _load(v_base, offs_n, Sk, HEAD_DIM, BLOCK_D)
            dp = dot(do, tl.trans(v), None, PRECISION)
            ds = p * (dp - delta[:, None])
            dq = dot(round_cast(ds, k.dtype), k, dq, PRECISION)
    return dq


@tuned(DQ_CONFIGS, DQ_MASKED_WIDE)
@triton.jit
def dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, KDOC, sm_scale, Hq, Sq, Sk, GROUP, doc_sb, kdoc_sb, WINDOW,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
              PRECISION: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (batch*head, query tile) program, longest causal rows first, like the forward."""
    bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = bh // Hq
    off = Sk - Sq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_base = bh.to(tl.int64) * Sq * HEAD_DIM
    kv_base = (bh // GROUP).to(tl.int64) * Sk * HEAD_DIM
    DOC += b.to(tl.int64) * doc_sb
    KDOC += b.to(tl.int64) * kdoc_sb
    doc_q, q_lo, q_hi = _query_docs(DOC, offs_m, Sq, off, MASKED)
    q = _load(Q + q_base, offs_m, Sq, HEAD_DIM, BLOCK_D)
    do = _load(DO + q_base, offs_m, Sq, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _key_split(start_m, Sk, off, CAUSAL, BLOCK_M, BLOCK_N)
    lo = 0
    if WINDOWED:
        lo, band = _window_split(start_m, off, WINDOW, full, BLOCK_M, BLOCK_N)
        dq = _dq_stage(dq, q, do, lse, delta, K + kv_base, V + kv_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m,
                       offs_m + off, lo, band, sm_scale * LOG2E, Sk, off, WINDOW, True, CAUSAL, MASKED, WINDOWED,
                       BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION)
        lo = band
    dq = _dq_stage(dq, q, do, lse, delta, K + kv_base, V + kv_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m, offs_m + off,
                   lo, full, sm_scale * LOG2E, Sk, off, WINDOW, False, CAUSAL, MASKED, WINDOWED, BLOCK_M, BLOCK_N,
                   HEAD_DIM, BLOCK_D, PRECISION)
    dq = _dq_stage(dq, q, do, lse, delta, K + kv_base, V + kv_base, DOC, KDOC, doc_q, q_lo, q_hi, start_m, offs_m + off,
                   full, hi, sm_scale * LOG2E, Sk, off, WINDOW, True, CAUSAL, MASKED, WINDOWED, BLOCK_M, BLOCK_N,
                   HEAD_DIM, BLOCK_D, PRECISION)
    _store(DQ + q_base, dq * sm_scale, offs_m, Sq, HEAD_DIM, BLOCK_D)
