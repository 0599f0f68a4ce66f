"""Scaled dot-product attention: the torch reference, which is also the CPU path.

Shapes: q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D) with Hq a multiple of Hkv (grouped-query).
When Sq < Sk (decoding with a KV cache) the causal mask is aligned to the bottom right:
query i sits at absolute position Sk - Sq + i. A sliding `window` W > 0 (causal only) keeps the
W most recent keys of each query, its own included: key j is seen by query i when i - W < j <= i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels.dispatch import register


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Packed-sequence boundaries as flash-attn's varlen API takes them ([0, len0, len0+len1, ...])
    turned into the per-position document labels (1, seq_len) that `attention` takes."""
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, positions, right=True) - 1)[None]


def build_mask(
    sq: int,
    sk: int,
    device: torch.device,
    causal: bool,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, Sq, Sk), True where a query may attend, or None for no mask.

    doc_ids (B, S) labels the document of each position of a packed sequence; queries only
    see keys of their own document. key_padding_mask (B, Sk) is False at padding keys. Every
    query keeps its own position, so padded rows stay finite instead of becoming NaN.
    """
    if not causal and doc_ids is None and key_padding_mask is None:
        return None
    offset = sk - sq
    qpos = torch.arange(sq, device=device)[:, None] + offset
    kpos = torch.arange(sk, device=device)[None, :]
    mask = (kpos <= qpos) if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window:
        mask = mask & (kpos > qpos - window)
    mask = mask[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, -sq:, None] == doc_ids[:, None, None, :])
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    return mask | (kpos == qpos)[None, None]


def _attention_low_precision_cpu(q, k, v, mask, dropout_p):
    """bf16/fp16 matmuls with an fp32 softmax. PyTorch's fused CPU attention is several times
    slower in bf16 than in fp32 (measured: 24 ms vs 5 ms per step of the Shakespeare recipe),
    while bf16 matmuls run at about twice the fp32 rate; grouped heads broadcast, not repeat."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, hq // hkv, sq, d)
    scores = (q @ k.unsqueeze(2).transpose(-1, -2)).float() * d**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
    return (probs.to(v.dtype) @ v.unsqueeze(2)).reshape(b, hq, sq, d)


def check_attention_args(q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None, causal: bool = True,
                         window: int = 0) -> None:
    """Argument errors every attention backend reports the same way."""
    if window < 0 or (window and not causal):
        raise ValueError(f"window={window} must be >= 0 (0: none) and needs causal=True")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if doc_ids is not None and doc_ids.shape[-1] != k.shape[2]:
        raise ValueError(f"doc_ids has length {doc_ids.shape[-1]}, keys have length {k.shape[2]}")


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    check_attention_args(q, k, doc_ids, causal, window)
    hq, hkv = q.shape[1], k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    window = window if window < sk else 0  # a window as long as the keys hides nothing
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        mask = build_mask(sq, sk, q.device, causal, doc_ids, key_padding_mask, window)
        return _attention_low_precision_cpu(q, k, v, mask, dropout_p)
    if doc_ids is None and key_padding_mask is None and not window and (not causal or sq == sk):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=dropout_p, enable_gqa=hq != hkv
        )
    mask = build_mask(sq, sk, q.device, causal, doc_ids, key_padding_mask, window)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=hq != hkv
    )


register("attention", "torch", attention_torch)
