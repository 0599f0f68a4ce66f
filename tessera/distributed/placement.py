"""Placements of a training run over the ranks of a job: what `tessera train` builds with.

A placement answers the questions the builder asks (which device, which data-parallel rank reads
which batches, how the model is spread, which engine and checkpointer to use, who writes metrics)
so that `core.build` and the trainer stay the same from one CPU process to hundreds of GPUs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from tessera.core.checkpoint import Checkpointer
from tessera.core.config import Config
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer
from tessera.core.placement import LocalPlacement, resolve_device
from tessera.core.seams import Placement
from tessera.distributed.checkpoint import ShardedCheckpointer
from tessera.distributed.engine import DistributedEngine, total_grad_norm
from tessera.distributed.env import DistributedEnv, init_distributed
from tessera.distributed.layout import check_layout
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize


class ParallelPlacement(LocalPlacement):
    """DDP, FSDP2/HSDP, TP/SP and activation checkpointing on the ranks of `env` (or one process)."""

    def __init__(self, env: DistributedEnv, dims: ParallelDims, async_save: bool = False):
        super().__init__(env.device)
        self.env, self.dims, self.async_save = env, dims, async_save
        self.rank, self.world_size = env.rank, env.world_size
        self.dp_rank, self.dp_size = dims.dp_rank(env.rank), dims.dp_size
        self.mesh = dims.build_mesh(env.device.type)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def check(self, cfg: Config) -> None:
        check_layout(cfg, self.dims)

    def prepare(self, model: Transformer, cfg: Config) -> Transformer:
        return parallelize(model, cfg.parallel, self.dims, self.mesh)

    def engine(self, model: Transformer, cfg: Config):
        optim = cfg.optim
        # offloaded (FSDP2's CPUOffloadPolicy), the sharded parameters and the optimizer live on the CPU
        where = torch.device("cpu") if cfg.parallel.offload_optimizer == "cpu" else self.device
        if optim.impl == "auto" and self.sharded:  # fused AdamW takes no DTensors on CPU
            optim = dataclasses.replace(optim, impl="foreach" if where.type == "cpu" else "fused")
        optimizer = build_optimizer(model, optim, where)
        return DistributedEngine(model, optimizer, self.device, cfg.train.precision, cfg.train.compile)

    def checkpointer(self, directory: Path, keep_last: int, attachments: tuple[Path, ...]) -> Checkpointer:
        return ShardedCheckpointer(directory, keep_last, attachments, self.async_save)

    def dp_group(self) -> dist.ProcessGroup | None:
        """This rank's data-parallel peers (the ranks of its TP index, TP being innermost); None,
        the default group, when every rank is a data-parallel rank. Collective: every rank calls it."""
        tp = self.dims.tp
        if tp == 1:
            return None
        groups = [dist.new_group([d * tp + t for d in range(self.dp_size)]) for t in range(tp)]
        return groups[self.rank % tp]

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        return total_grad_norm(params)


def placement_for(cfg: Config) -> Placement:
    """The placement `cfg.parallel` asks for on the ranks this process was launched with."""
    device = resolve_device(cfg.train.device)
    env = init_distributed(device.type)
    dims = ParallelDims.resolve(cfg.parallel, env.world_size)
    check_layout(cfg, dims)
    if cfg.parallel.engine == "deepspeed":
        from tessera.distributed.deepspeed_engine import DeepSpeedPlacement

        return DeepSpeedPlacement(env, dims)
    return ParallelPlacement(env, dims, cfg.checkpoint.async_save)
