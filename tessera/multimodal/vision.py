"""A Vision Transformer image encoder built from the text model's own parts.

Images are cut into patches by a strided convolution, given learned position embeddings (and a
class token with `pool = "cls"`), and run through `core.model.Block`s with the causal mask off, so
attention, norms and the MLP go through the same `tessera.kernels` as the language model. The
knobs that differ between ViT, OpenAI CLIP and SigLIP towers (a norm before the blocks, a final
norm of all tokens or of the pooled feature only, class / mean / attention pooling, the MLP's
activation) are fields of `VisionConfig`, so an imported tower is this module with their values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tessera import kernels
from tessera.core.config import ModelConfig, VisionConfig
from tessera.core.model import MLP, Block, Norm


class AttentionPool(nn.Module):
    """Multi-head attention pooling ("MAP", SigLIP's head): a learned probe attends over the tokens,
    then a residual MLP on the normed result."""

    def __init__(self, cfg: ModelConfig, activation: str):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.probe = nn.Parameter(torch.zeros(cfg.d_model))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))
        self.norm, self.mlp = Norm(cfg), MLP(cfg, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.wq(self.probe).view(1, self.n_heads, 1, self.head_dim).expand(b, -1, -1, -1)
        k = self.wk(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        h = self.wo(kernels.attention(q, k, v, causal=False).transpose(1, 2).reshape(b, d))
        return h + self.mlp(self.norm(h))


class VisionTransformer(nn.Module):
    """Pixels (B, C, H, W) -> token features (B, N, d_model) and a pooled feature (B, d_model)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        blocks = cfg.block_config()
        self.patch_emb = nn.Conv2d(cfg.channels, cfg.d_model, cfg.patch_size, stride=cfg.patch_size,
                                   bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.pool == "cls" else None
        self.pos_emb = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_norm = Norm(blocks) if cfg.pre_norm else None
        self.layers = nn.ModuleList(Block(blocks, causal=False, activation=cfg.activation)
                                    for _ in range(cfg.n_layers))
        self.norm = Norm(blocks)
        self.head = AttentionPool(blocks, cfg.activation) if cfg.pool == "map" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, std) for weights and embeddings, residual projections scaled by 1/sqrt(2 * n_layers);
        norms at one, biases at zero."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images of shape {tuple(pixels.shape[1:])} given to an encoder of "
                             f"(channels, size, size) = ({cfg.channels}, {cfg.image_size}, {cfg.image_size})")
        x = self.patch_emb(pixels).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.drop(x + self.pos_emb)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        if cfg.final_norm == "pooled":
            return x, self.norm(self.pool(x))
        x = self.norm(x)
        return x, self.pool(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.pool == "mean":
            return x.mean(dim=1)
        return self.head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Training FLOPs of one image (forward + backward): 6 per parameter per token plus attention."""
        c = self.cfg
        n = c.num_tokens
        return n * (6 * self.num_params() + 12 * c.n_layers * c.d_model * n)

