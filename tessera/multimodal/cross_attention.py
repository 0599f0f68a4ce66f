"""Flamingo-style gated cross-attention: text hidden states attend to image tokens, and the result
is added through tanh gates that start at 0 (the LM is unchanged until training opens them).

The layers are applied from outside the decoder: a forward pre-hook on a block hands the block
`x + gated cross-attention(x, images)` instead of `x`, so `core.model` stays plain and the LM's
weights keep their own names (the text part still converts to Hugging Face). Under tensor
parallelism they stay replicated (whole heads on every rank), like the vision tower.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from tessera import kernels
from tessera.core.config import ModelConfig
from tessera.core.model import MLP, Norm


class GatedCrossAttention(nn.Module):
    """x + tanh(a) * attn(norm(x), images); then + tanh(b) * mlp(norm(.)); a = b = 0 at init."""

    # Replicated under tensor parallelism; with sequence parallelism the block input it is hooked on is
    # one rank's slice of the sequence, so `distributed.parallelize` hands it the whole sequence instead.
    whole_sequence = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.attn_norm, self.mlp_norm = Norm(cfg), Norm(cfg)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.mlp = MLP(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        for p in (self.wq.weight, self.wk.weight, self.wv.weight, self.wo.weight, self.mlp.up.weight, self.mlp.down.weight):
            nn.init.normal_(p, 0.0, cfg.init_std)
        if self.mlp.gate is not None:
            nn.init.normal_(self.mlp.gate.weight, 0.0, cfg.init_std)

    def forward(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """`x` (B, S, d) text, `images` (B, T, d) the projected tokens of each row's images."""
        b, s, _ = x.shape
        t = images.shape[1]
        q = self.wq(self.attn_norm(x)).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(images).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(images).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        y = kernels.attention(q, k, v, causal=False).transpose(1, 2).reshape(b, s, -1)
        x = x + torch.tanh(self.attn_gate) * self.wo(y)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class CrossAttentionHooks:
    """Forward pre-hooks on decoder blocks (index -> layer) that apply the gated layers to each
    block's input, reading the images last handed to `read` (kept until the next call, so that
    activation checkpointing's recomputation in backward sees the same ones)."""

    def __init__(self, lm: nn.Module, layers: dict[int, GatedCrossAttention]):
        self.images: torch.Tensor | None = None
        for index, layer in layers.items():
            # a partial of a bound method, not a closure: a deep copy of the model then hooks its own copies
            lm.layers[index].register_forward_pre_hook(partial(self._apply, layer), with_kwargs=True)

    def _apply(self, layer: GatedCrossAttention, module: nn.Module, args: tuple, kwargs: dict):
        if self.images is None:
            raise ValueError("cross-attention layers were run without images")
        return (layer(args[0], self.images), *args[1:]), kwargs

    def read(self, images: torch.Tensor) -> None:
        self.images = images

    def __deepcopy__(self, memo: dict) -> CrossAttentionHooks:
        """A copied model's hooks start without images (those of the last call belong to its graph)."""
        copied = CrossAttentionHooks.__new__(CrossAttentionHooks)
        copied.images = None
        return copied
