"""The single-process placement: where a run executes when nothing spreads it.

`tessera.distributed` supplies placements for DDP/FSDP2/TP and DeepSpeed with the same methods
(the `seams.Placement` protocol), so `build_trainer` and the trainer never learn how many ranks
there are.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.checkpoint import Checkpointer
from tessera.core.config import Config, ConfigError
from tessera.core.engine import LocalEngine, gradient_norm
from tessera.core.metrics import MetricsLogger, NullMetrics
from tessera.core.optim import build_optimizer
from tessera.core.seams import MetricsWriter


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; valid here: auto, cpu")
    return torch.device(name)


class LocalPlacement:
    """One process on one device; the base the distributed placements extend."""

    rank, dp_rank, dp_size, world_size = 0, 0, 1, 1

    def __init__(self, device: torch.device):
        self.device = device

    def check(self, cfg: Config) -> None:
        """Refuse a layout this placement cannot run, rather than ignoring it."""
        p = cfg.parallel
        ranks = p.dp_replicate * max(p.dp_shard, 1) * p.tp
        if (ranks > 1 or p.engine != "fsdp" or p.activation_checkpoint != "none" or p.mixed_precision != "none"
                or p.offload_optimizer != "none"):
            raise ConfigError("a single-process placement takes no parallel layout; launch "
                              "tessera.distributed's placement (`tessera train` does)")

    def prepare(self, model: nn.Module, cfg: Config) -> nn.Module:
        return model

    def engine(self, model: nn.Module, cfg: Config) -> LocalEngine:
        optimizer = build_optimizer(model, cfg.optim, self.device)
        return LocalEngine(model, optimizer, self.device, cfg.train.precision, cfg.train.compile)

    def checkpointer(self, directory: Path, keep_last: int, attachments: tuple[Path, ...]) -> Checkpointer:
        return Checkpointer(directory, keep_last, attachments)

    def metrics(self, run_dir: Path, tensorboard: bool, resume_step: int | None) -> MetricsWriter:
        """One writer per run: the first rank's logger, nothing on the others."""
        return MetricsLogger(run_dir, tensorboard, resume_step) if self.rank == 0 else NullMetrics()

    def dp_group(self):
        """The process group of this rank's data-parallel peers; None: the default group."""
        return None

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The L2 norm of the gradients of `params`, over however the placement spread them."""
        return gradient_norm(params)
