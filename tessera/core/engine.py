"""The engine: how one process turns a batch into gradients and an update.

The trainer talks only to this interface, so that `tessera.distributed` can supply engines
for FSDP2, tensor parallelism or DeepSpeed without the trainer changing.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class LocalEngine:
    """A single-process engine: autocast, backward, global-norm clipping and the optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", compile: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self._forward = torch.compile(model) if compile else model

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Loss of one micro-batch (detached); gradients of loss * scale are accumulated."""
        self.model.train()
        with self.autocast():
            loss = self._forward(inputs, targets)
        (loss * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self.autocast():
            return self._forward(inputs, targets).float()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping; clips only when max_norm > 0."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def any_rank(self, flag: bool) -> bool:
        """True if `flag` is set on any rank: decisions such as stopping must be taken together."""
        return flag

    def max_over_ranks(self, value: float) -> float:
        return value
