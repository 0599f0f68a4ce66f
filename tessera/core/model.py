"""A decoder-only transformer with the knobs of both GPT-2 and Llama.

Plain PyTorch: attention, norms, RoPE, SwiGLU and the loss go through `tessera.kernels`, and
parallelism is applied from outside by `tessera.distributed`. GPT-2 style is LayerNorm + learned
positions + GELU (+ biases); Llama style is RMSNorm + RoPE + SwiGLU + grouped-query attention,
with Mistral's sliding window, Qwen2's q/k/v biases, scaled RoPE and free head widths as knobs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera import kernels
from tessera.core.config import ModelConfig
from tessera.core.kv_cache import KVCache
from tessera.core.rope_scaling import rope_tables


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.bias and cfg.norm == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {  # the MLP's non-linearity by name (vision towers imported from Hugging Face differ)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0, causal: bool = True):
        super().__init__()
        self.causal = causal  # False: every position sees every other (vision encoders)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout, self.window = cfg.dropout, window

    def forward(self, x, *, rope, doc_ids, key_padding_mask, cache: KVCache | None, layer: int):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = kernels.rope(q, *rope), kernels.rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = kernels.attention(
            q, k, v, causal=self.causal, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0, window=self.window,
        )
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, activation: str = "gelu_tanh"):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.act = ACTIVATIONS[activation]
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        h = kernels.swiglu(self.gate(x), self.up(x)) if self.swiglu else self.act(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0, causal: bool = True, activation: str = "gelu_tanh"):
        super().__init__()
        self.attn_norm, self.attn = Norm(cfg), Attention(cfg, window, causal)
        self.mlp_norm, self.mlp = Norm(cfg), MLP(cfg, activation)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()  # two calls a block: none when off

    def forward(self, x, *, rope=None, doc_ids=None, key_padding_mask=None, cache=None, layer=0):
        """Only the hidden states are positional: what parallelism lays out (TP's input layouts) is
        the one positional argument of a block and of its attention."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope=rope, doc_ids=doc_ids,
                                    key_padding_mask=key_padding_mask, cache=cache, layer=layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer when 0)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, cfg.window_of(i)) for i in range(cfg.n_layers))
        self.norm = Norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # see rope_window
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states (B, S, d_model) for token ids `idx` (B, S), or for input
        embeddings (B, S, d_model) given in their place (an image-conditioned LM's image tokens)."""
        x = self.tok_emb(idx) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        start = cache.length if cache is not None else 0
        rope = None
        if positions is None and self.pos_emb is None and start + s <= self.cfg.max_seq_len:
            rope = self.rope_window(start, s, x.device)
        else:
            if positions is None:
                positions = torch.arange(start, start + s, device=x.device).expand(b, s)
            if self.pos_emb is not None:
                x = x + self.pos_emb(positions)
            else:
                rope = rope_tables(self.cfg, positions)
        x = self.drop(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, doc_ids=doc_ids, key_padding_mask=key_padding_mask, cache=cache, layer=i)
        if cache is not None:
            cache.advance(s)
        return self.norm(x)

    def rope_window(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, 1, length, head_dim) of positions start.., sliced from tables of the whole context
        built once per device (the same values `rope_tables` computes; not a buffer, so that casting
        the model leaves them in fp32 and checkpoints do not hold them)."""
        if self._rope is None or self._rope[0].device != device:
            positions = torch.arange(self.cfg.max_seq_len, device=device)[None]
            self._rope = rope_tables(self.cfg, positions)
        cos, sin = self._rope
        return cos[:, :, start : start + length], sin[:, :, start : start + length]

    def forward(self, idx, targets=None, positions=None, doc_ids=None, key_padding_mask=None,
                cache=None, ignore_index: int = -100, inputs_embeds=None):
        """Mean cross-entropy against `targets` when given; otherwise the logits (B, S, vocab).
        `inputs_embeds` (B, S, d_model) replaces the token lookup (`idx` is then None)."""
        h = self.hidden_states(idx, positions, doc_ids, key_padding_mask, cache, inputs_embeds)
        if targets is None:
            logits = self.lm_head(h)
            return logits.to(torch.promote_types(logits.dtype, torch.float32))
        return kernels.linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; without the embedding lookups when exclude_embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N plus the attention score matmuls."""
        c = self.cfg
        attn = 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
        return 6 * self.num_params(exclude_embeddings=True) + attn
