"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules.

Schedules are pure functions of the step, so resuming needs only the step count.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tessera.core.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices of linear layers; not norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _implementation(cfg: OptimConfig, device: torch.device) -> dict:
    impl = cfg.impl
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
        **_implementation(cfg, device),
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        end = cfg.decay_steps or total_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    decay = cfg.decay_steps or max(1, total_steps // 5)  # warmup-stable-decay: linear decay at the end
    decay_start = total_steps - decay
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / decay)
    return cfg.lr + progress * (cfg.min_lr - cfg.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
