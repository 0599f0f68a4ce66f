"""Kernels the model calls: attention, norms, RoPE, SwiGLU, losses. One entry point per op.

The implementation behind each function is chosen by `dispatch.configure(...)` (once per run,
from its `[kernels]` config section; `use(...)` for a block) and the device of the inputs,
never by the caller. Importing
this package registers every implementation whose dependencies are installed.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from tessera.kernels import (  # noqa: F401
    attention_flash_attn, attention_torch, cross_entropy_torch, dispatch, norms_torch, rope_torch, swiglu_torch,
)
from tessera.kernels.attention_torch import doc_ids_from_cu_seqlens
from tessera.kernels.dispatch import BACKENDS, KernelBackendError, configure, use

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True
    from tessera.kernels import (  # noqa: F401
        attention_triton, cross_entropy_triton, norms_triton, rope_triton, swiglu_triton,
    )


def attention(q, k, v, causal: bool = True, doc_ids=None, key_padding_mask=None, dropout_p: float = 0.0,
              window: int = 0):
    """softmax(q k^T / sqrt(d)) v with causal, packed-document, padding and sliding-window masks.

    Packed sequences: `doc_ids` (B, S) labels each position's document, so samples packed into
    one row never attend to each other; `doc_ids_from_cu_seqlens` converts varlen boundaries.
    `window` > 0 (causal): each query sees only its `window` most recent keys, itself included."""
    return dispatch.resolve("attention", q.device)(q, k, v, causal, doc_ids, key_padding_mask, dropout_p, window)


def layer_norm(x, weight, bias=None, eps: float = 1e-5, residual=None):
    return dispatch.resolve("layer_norm", x.device)(x, weight, bias, eps, residual)


def rms_norm(x, weight, eps: float = 1e-6, residual=None):
    return dispatch.resolve("rms_norm", x.device)(x, weight, eps, residual)


def rope(x, cos, sin):
    """Rotary position embedding of x (B, H, S, D) with cos/sin tables broadcastable to it
    (Hugging Face Llama convention: the two halves of each head rotate together)."""
    return dispatch.resolve("rope", x.device)(x, cos, sin)


def swiglu(gate, up):
    """silu(gate) * up: the gated activation of a SwiGLU MLP."""
    return dispatch.resolve("swiglu", gate.device)(gate, up)


def cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    return dispatch.resolve("cross_entropy", logits.device)(
        logits, targets, ignore_index, label_smoothing, z_loss, reduction
    )


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the LM head's logits without materialising all of them. A weight
    sharded over ranks (a DTensor: loss parallelism) goes to the implementation registered for it."""
    if isinstance(weight, DTensor):
        return dispatch.implementation("linear_cross_entropy", "vocab_parallel")(hidden, weight, targets, ignore_index)
    return dispatch.resolve("linear_cross_entropy", hidden.device)(hidden, weight, targets, ignore_index)


__all__ = [
    "BACKENDS", "KernelBackendError", "attention", "configure", "cross_entropy", "doc_ids_from_cu_seqlens",
    "layer_norm", "linear_cross_entropy", "rms_norm", "rope", "swiglu", "use",
]
