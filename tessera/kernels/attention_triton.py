"""Flash attention in Triton: a tiled online-softmax forward and a recomputing backward.

The torch path materialises the (Sq, Sk) score matrix of every head. These kernels
(`attention_triton_kernels`) keep scores in on-chip tiles, save only the log-sum-exp of each
query row, and recompute the probabilities from it in backward, so memory is linear in the
sequence length; bf16/fp16 inputs run their dots on tensor cores with fp32 accumulators.

Semantics match `attention_torch` (see `build_mask`): causal masks are aligned bottom-right
when Sq < Sk; `doc_ids` (B or 1, Sk) keeps queries inside their packed document;
`key_padding_mask` (B or 1, Sk) is False at padding keys; every query always keeps its own
position; a sliding `window` W keeps keys i - W < j <= i. A mask of one row serves the whole
batch, as it broadcasts in the torch path.

Handled in the kernels: causal and non-causal, grouped-query and multi-query heads (query head
h reads kv head h // (Hq // Hkv); K/V are never repeated, and the dK/dV program of a kv head
loops over its query heads), head dims up to 128 (padded to a power of two with masks), any
sequence length, fp32/fp16/bf16 inputs (fp32 with exact fp32 dots).

Falls back to `attention_torch`: dropout_p > 0 (the kernels have no RNG, and backward would
have to regenerate the forward's dropout mask), head dims above 128 (the tiles would not fit in
registers), and dtypes other than fp32/fp16/bf16 (the kernels accumulate in fp32, which would
silently lose fp64 precision).
"""
from __future__ import annotations

import torch
import triton

from tessera.kernels import attention_triton_kernels as kern
from tessera.kernels.attention_torch import attention_torch, check_attention_args
from tessera.kernels.dispatch import register

MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DELTA_BLOCK = 64


def _mask_rows(mask: torch.Tensor | None, batch: int, sk: int) -> torch.Tensor | None:
    """A (B or 1, Sk) mask checked, or None."""
    if mask is not None and (mask.dim() != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != sk):
        raise ValueError(f"attention masks must have shape ({batch}, {sk}) or (1, {sk}), got {tuple(mask.shape)}")
    return mask


def _documents(doc_ids, key_padding_mask, batch: int, sk: int, device):
    """(query documents, key documents) as int32 rows (B or 1, Sk), with their batch strides (0: one
    row for all). A padding key gets a document id below every real one, so no query matches it."""
    doc = _mask_rows(doc_ids, batch, sk)
    kpm = _mask_rows(key_padding_mask, batch, sk)
    doc = torch.zeros(1, sk, dtype=torch.int32, device=device) if doc is None else doc.to(torch.int32).contiguous()
    kdoc = doc if kpm is None else torch.where(kpm.bool(), doc, doc.amin() - 1).contiguous()
    return doc, kdoc, (sk if doc.shape[0] > 1 else 0), (sk if kdoc.shape[0] > 1 else 0)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, doc_ids, key_padding_mask, window):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        masked = doc_ids is not None or key_padding_mask is not None
        if masked:
            doc, kdoc, doc_sb, kdoc_sb = _documents(doc_ids, key_padding_mask, b, sk, q.device)
        else:
            doc, kdoc, doc_sb, kdoc_sb = q, q, 0, 0  # never read
        meta = dict(HEAD_DIM=d, CAUSAL=bool(causal), MASKED=masked, WINDOWED=window > 0,
                    BLOCK_D=max(16, triton.next_power_of_2(d)),
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        o = torch.empty_like(q)
        lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
        args = (doc, kdoc, d**-0.5, hq, sq, sk, hq // hkv, doc_sb, kdoc_sb, window)
        kern.fwd_kernel[lambda m: (b * hq, triton.cdiv(sq, m["BLOCK_M"]))](q, k, v, o, lse, *args, **meta)
        ctx.save_for_backward(q, k, v, o, lse, doc, kdoc)
        ctx.meta, ctx.args = meta, args[2:]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc, kdoc = ctx.saved_tensors
        meta, args = ctx.meta, (doc, kdoc, *ctx.args)
        do = do.contiguous()
        b, hq, sq, _ = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        delta = torch.empty_like(lse)
        kern.delta_kernel[(b * hq, triton.cdiv(sq, DELTA_BLOCK))](
            o, do, delta, sq, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=DELTA_BLOCK)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kern.dkdv_kernel[lambda m: (b * hkv, triton.cdiv(sk, m["BLOCK_N"]))](
            q, k, v, do, lse, delta, dk, dv, *args, **meta)
        kern.dq_kernel[lambda m: (b * hq, triton.cdiv(sq, m["BLOCK_M"]))](
            q, k, v, do, lse, delta, dq, *args, **meta)
        return dq, dk, dv, None, None, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by the Triton kernels; same contract as `attention_torch`."""
    check_attention_args(q, k, doc_ids, causal, window)
    if dropout_p > 0 or q.shape[-1] > MAX_HEAD_DIM or q.dtype not in KERNEL_DTYPES:
        return attention_torch(q, k, v, causal, doc_ids, key_padding_mask, dropout_p, window)
    return _FlashAttention.apply(q, k, v, causal, doc_ids, key_padding_mask, window if window < k.shape[2] else 0)


register("attention", "triton", attention_triton)
