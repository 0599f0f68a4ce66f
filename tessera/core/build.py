"""Assemble a training run from a Config: device, tokenizer, data, model, engine, trainer.

This is the one place that wires the pieces together; each piece knows only its own inputs.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch

from tessera import kernels
from tessera.core.checkpoint import Checkpointer, checkpoint_step
from tessera.core.config import Config, ConfigError, to_toml
from tessera.core.data import DataError
from tessera.core.engine import LocalEngine, gradient_norm
from tessera.core.metrics import MetricsLogger, NullMetrics, peak_flops
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer
from tessera.core.task import LanguageModelingTask
from tessera.core.trainer import Trainer, TrainerParts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; valid here: auto, cpu")
    return torch.device(name)


def with_vocab(cfg: Config, vocab_size: int) -> Config:
    """The config with model.vocab_size taken from the data when left at 0."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is below the tokenizer's {vocab_size}")
    return cfg


class Placement:
    """Where a run executes and how its model is spread: one process here.

    `tessera.distributed` supplies placements for DDP/FSDP/TP and DeepSpeed with the same
    methods, so this builder (and the trainer) never learn how many ranks there are.
    """

    rank, dp_rank, dp_size, world_size = 0, 0, 1, 1

    def __init__(self, device: torch.device):
        self.device = device

    def check(self, cfg: Config) -> None:
        """Refuse a layout this placement cannot run, rather than ignoring it."""
        p = cfg.parallel
        ranks = p.dp_replicate * max(p.dp_shard, 1) * p.tp
        if ranks > 1 or p.engine != "fsdp" or p.activation_checkpoint != "none" or p.mixed_precision != "none":
            raise ConfigError("a single-process placement takes no parallel layout; launch "
                              "tessera.distributed's placement (`tessera train` does)")

    def prepare(self, model: Transformer, cfg: Config) -> Transformer:
        return model

    def engine(self, model: Transformer, cfg: Config):
        optimizer = build_optimizer(model, cfg.optim, self.device)
        return LocalEngine(model, optimizer, self.device, cfg.train.precision, cfg.train.compile)

    def checkpointer(self, directory: Path, keep_last: int, attachments: tuple[Path, ...]) -> Checkpointer:
        return Checkpointer(directory, keep_last, attachments)

    def metrics(self, run_dir: Path, tensorboard: bool, resume_step: int | None):
        """One writer per run: the first rank's logger, nothing on the others."""
        return MetricsLogger(run_dir, tensorboard, resume_step) if self.rank == 0 else NullMetrics()

    def dp_group(self):
        """The process group of this rank's data-parallel peers; None: the default group."""
        return None

    def grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The L2 norm of the gradients of `params`, over however the placement spread them."""
        return gradient_norm(params)


def resume_path(resume: str, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint that checkpoint.resume names: none, the newest complete one ("auto"), or a path."""
    if resume == "auto":
        return checkpointer.latest()
    if resume and not (Path(resume) / "config.json").exists():
        raise ConfigError(f"checkpoint.resume={resume!r} is not a checkpoint directory; valid: '', 'auto', a path")
    return Path(resume) if resume else None


def build_trainer(cfg: Config, placement: Placement | None = None,
                  init_weights: Callable[[Transformer], None] | None = None,
                  task: LanguageModelingTask | None = None) -> tuple[Config, Trainer]:
    """A ready-to-fit Trainer (resumed when checkpoint.resume asks for it) and the final config.

    `init_weights` fills the new model before it is spread (fine-tuning from `model.init_from`);
    `task` is what is learned (pretraining on prepared shards unless an alignment stage says).
    """
    placement = placement or Placement(resolve_device(cfg.train.device))
    placement.check(cfg)
    kernels.configure(cfg.kernels.backend, **cfg.kernels.overrides())
    device = placement.device
    if device.type == "cpu" and "triton" in kernels.dispatch.current().values() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels backend 'triton' on CPU runs only under Triton's interpreter: start with "
                          "TRITON_INTERPRET=1 (slow, for testing); valid on CPU otherwise: auto, torch")
    task = task or LanguageModelingTask(cfg)
    cfg = with_vocab(cfg, task.vocab_size)
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    model = task.build_model(cfg, device, init_weights)
    with torch.device("meta"):  # the trained body's FLOPs, whatever head or adapters the task adds
        flops_per_token = Transformer(cfg.model).flops_per_token(cfg.train.seq_len)
    engine = placement.engine(placement.prepare(model, cfg), cfg)
    engine.objective = task.objective
    task.attach(placement, cfg, init_weights)
    train_loader, val_loader = task.loaders(cfg, placement.dp_rank, placement.dp_size)
    run_dir = Path(cfg.train.run_dir)
    if placement.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    checkpointer = placement.checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, task.tokenizer_files)
    resume_from = resume_path(cfg.checkpoint.resume, checkpointer)
    resume_step = checkpoint_step(resume_from) if resume_from else None
    parts = TrainerParts(
        engine=engine, train_loader=train_loader, val_loader=val_loader, checkpointer=checkpointer,
        metrics=placement.metrics(run_dir, cfg.log.tensorboard, resume_step), device=device,
        flops_per_token=flops_per_token, peak_flops=peak_flops(device, cfg.log.peak_tflops),
        dp_size=placement.dp_size, devices=placement.world_size, console=placement.rank == 0,
        val_perplexity=task.val_perplexity,
    )
    trainer = Trainer(cfg, parts)
    if resume_from:
        trainer.resume(resume_from)
    return cfg, trainer


__all__ = ["DataError", "Placement", "build_trainer", "resolve_device"]
