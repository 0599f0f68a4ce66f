"""Attention through the flash-attn package (optional extra, CUDA only).

flash-attn cannot be built against a CPU torch, so it is imported lazily behind a guard: the
backend is registered only when the package imports, and asking for it otherwise is a clear
error from the dispatcher. Packed documents and padding masks need flash-attn's varlen entry
points with cumulative sequence lengths; until they are wired, those calls are refused.
"""
from __future__ import annotations

from tessera.kernels.attention_torch import check_attention_args
from tessera.kernels.dispatch import register

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attention_flash_attn(q, k, v, causal=True, doc_ids=None, key_padding_mask=None, dropout_p=0.0, window=0):
    check_attention_args(q, k, doc_ids, causal, window)
    if doc_ids is not None or key_padding_mask is not None:
        raise NotImplementedError("the flash_attn backend does not take doc_ids or key_padding_mask yet; "
                                  "set kernels.attention = 'triton' or 'torch'")
    # flash-attn takes (B, S, H, D); grouped-query heads are native. Its causal mask is
    # bottom-right aligned, as Tessera's is when Sq < Sk. Its window counts the keys left of the
    # query's own, so Tessera's window W (own key included) is (W - 1, 0); (-1, -1) is none.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, causal=causal, window_size=(window - 1, 0) if window else (-1, -1))
    return out.transpose(1, 2)


if flash_attn_func is not None:
    register("attention", "flash_attn", attention_flash_attn)
