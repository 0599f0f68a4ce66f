"""The engine for DDP, FSDP2/HSDP and tensor parallelism: LocalEngine plus two reductions.

Gradients are already averaged over data-parallel ranks by FSDP/DDP during backward. What is
left is what the trainer logs and clips by: the loss (each rank's is of its own slice of the
batch) and the gradient norm (each rank holds shards of the gradients, on up to two meshes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from tessera.core.engine import LocalEngine, scale_gradients_to


def world_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks. The ranks of one TP group hold the same loss, so this equals the
    mean over data-parallel ranks (gloo has no AVG, hence SUM / world)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def world_max(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def total_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients; DTensor gradients are grouped by mesh and layout, each group's
    norm reduced over its mesh, so sharded and replicated parameters each count once."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    squares = []
    for key, grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads, foreach=False if key is not None else None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def split_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Split every param group by tensor kind (plain, or DTensor per mesh), in place.

    foreach/fused optimizers cannot mix plain tensors and DTensors in one call, and pure TP
    leaves the embeddings, final norm and LM head plain. Call before the first step.
    """
    groups = []
    for group in optimizer.param_groups:
        kinds: dict = {}
        for p in group["params"]:
            kinds.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        groups += [{**group, "params": params} for params in kinds.values()]
    optimizer.param_groups[:] = groups


class DistributedEngine(LocalEngine):
    """Same interface as LocalEngine; `model` is the parallelized module (same parameter names)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", compile: bool = False, **kwargs):
        super().__init__(model, optimizer, device, precision, compile, **kwargs)
        self.eval_in_training_graph = False  # FSDP expects a backward after every forward with grad
        split_param_groups(optimizer)

    def forward_backward(self, batch, scale: float = 1.0) -> torch.Tensor:
        """Global mean loss (and metrics) of the micro-batch (detached) across data-parallel ranks."""
        loss = world_mean(super().forward_backward(batch, scale))
        self.metrics = {k: world_mean(v) for k, v in self.metrics.items()}
        return loss

    @torch.no_grad()
    def eval_loss(self, batch) -> torch.Tensor:
        """Global mean loss; FSDP's root and last block stay gathered after a forward without
        backward, so they are resharded here rather than held through evaluation."""
        loss = super().eval_loss(batch)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        self.metrics = {k: world_mean(v) for k, v in self.metrics.items()}
        return world_mean(loss)

    def any_rank(self, flag: bool) -> bool:
        return world_max(float(flag)) > 0

    def max_over_ranks(self, value: float) -> float:
        return world_max(value)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping, over all shards; clips only when max_norm > 0."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = total_grad_norm(params)
        if max_norm > 0:
            scale_gradients_to(params, norm, max_norm)
        return norm
