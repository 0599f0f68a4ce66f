"""Assemble a run from a Config, a placement and a task: kernels, data, models, engine, trainer.

This is the one assembly of every stage (pretraining, SFT, RM, DPO, PPO, GRPO, ...); each
piece knows only its own inputs, and the placement alone knows how many ranks there are.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from pathlib import Path

import torch

from tessera import kernels
from tessera.core.checkpoint import checkpoint_step
from tessera.core.config import Config, ConfigError, to_toml
from tessera.core.metrics import peak_flops
from tessera.core.model import Transformer
from tessera.core.placement import LocalPlacement, resolve_device
from tessera.core.seams import CheckpointStore, InitWeights, Placement, Task
from tessera.core.speed import resolve, retain_freed_memory
from tessera.core.task import LanguageModelingTask
from tessera.core.trainer import Trainer, TrainerParts


def with_vocab(cfg: Config, vocab_size: int, console: bool = True) -> Config:
    """The config with model.vocab_size taken from the data when left at 0; a larger one is stated."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is below the tokenizer's {vocab_size}")
    if cfg.model.vocab_size > vocab_size and console:
        print(f"note: model.vocab_size={cfg.model.vocab_size} is larger than the tokenizer's {vocab_size}: "
              f"{cfg.model.vocab_size - vocab_size} embedding rows are never used (0 takes the tokenizer's)")
    return cfg


def fresh_run_dir(cfg: Config, checkpointer: CheckpointStore, first_rank: bool) -> None:
    """A fresh run never mixes with an older one in its run_dir: refused while checkpoints are there,
    unless checkpoint.overwrite, which removes them and the old history first."""
    latest = checkpointer.latest()
    if latest is None:
        return
    run_dir = Path(cfg.train.run_dir)
    if not cfg.checkpoint.overwrite:
        raise ConfigError(f"train.run_dir={str(run_dir)!r} already holds a run (newest checkpoint {latest.name}): "
                          "continue it with --resume auto, choose another train.run_dir, or replace it with "
                          "--overwrite")
    if first_rank:
        for old in ("checkpoints", "metrics.jsonl", "tensorboard"):
            path = run_dir / old
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"--overwrite: removed the earlier run's checkpoints and history in {run_dir}")


def configure_kernels(cfg: Config, device: torch.device) -> None:
    """The run's kernel backends, chosen once; Triton on CPU tensors only under its interpreter."""
    kernels.configure(cfg.kernels.backend, **cfg.kernels.overrides())
    if device.type == "cpu" and "triton" in kernels.dispatch.current().values() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels backend 'triton' on CPU runs only under Triton's interpreter: start with "
                          "TRITON_INTERPRET=1 (slow, for testing); valid on CPU otherwise: auto, torch")


def resume_path(resume: str, checkpointer: CheckpointStore) -> Path | None:
    """The checkpoint that checkpoint.resume names: none, the newest complete one ("auto"), or a path."""
    if resume == "auto":
        return checkpointer.latest()
    if resume and not (Path(resume) / "config.json").exists():
        raise ConfigError(f"checkpoint.resume={resume!r} is not a checkpoint directory; valid: '', 'auto', a path")
    return Path(resume) if resume else None


def build_trainer(cfg: Config, placement: Placement | None = None, init_weights: InitWeights | None = None,
                  task: Task | None = None) -> tuple[Config, Trainer]:
    """A ready-to-fit Trainer (resumed when checkpoint.resume asks for it) and the final config.

    `init_weights` fills the new models before they are spread (fine-tuning from `model.init_from`);
    `task` is what is learned (pretraining on prepared shards unless a stage says).
    """
    placement = placement or LocalPlacement(resolve_device(cfg.train.device))
    placement.check(cfg)
    task = task or LanguageModelingTask(cfg)
    task.check(cfg, placement)
    if cfg.data.max_tokens and not getattr(task, "token_budget", False):
        raise ConfigError("data.max_tokens batches SFT samples by a token budget (tessera sft); pretraining windows "
                          "and this stage's batches hold a fixed number of tokens already: set data.max_tokens=0")
    device = placement.device
    cfg, speed = resolve(cfg, device, placement.world_size, task.static_shapes)
    if device.type == "cpu" and retain_freed_memory():
        speed += "; freed memory kept for the next step (glibc mallopt)"
    if placement.rank == 0:
        print(f"speed: {speed}", flush=True)
    configure_kernels(cfg, device)
    cfg = with_vocab(cfg, task.vocab_size, placement.rank == 0)
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    model = task.build_model(cfg, device, init_weights)
    with torch.device("meta"):  # the trained body's FLOPs, whatever head or adapters the task adds
        body = Transformer(cfg.model)
    flops_per_token = functools.cache(body.flops_per_token)  # counted once per window length, not at every step
    engine = placement.engine(placement.prepare(model, cfg), cfg)
    engine.objective = task.objective
    task.attach(placement, cfg, engine, init_weights)
    train_loader, val_loader = task.loaders(cfg, placement.dp_rank, placement.dp_size)
    if cfg.train.seq_len_schedule and not hasattr(train_loader, "set_seq_len"):
        raise ConfigError("train.seq_len_schedule applies to pretraining on prepared shards (tessera train); "
                          "this stage's samples have their own lengths: set train.seq_len_schedule=[]")
    skipped = train_loader.skipped + (val_loader.skipped if val_loader is not None else 0)
    if skipped and placement.rank == 0:
        print(f"data: skipped {skipped} unusable records of {cfg.data.path}"
              + (f" and {cfg.align.val_path}" if cfg.align.val_path else "") + " (data.on_error='skip')")
    run_dir = Path(cfg.train.run_dir)
    if placement.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    checkpointer = placement.checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, task.tokenizer_files)
    resume_from = resume_path(cfg.checkpoint.resume, checkpointer)
    if resume_from is None:
        fresh_run_dir(cfg, checkpointer, placement.rank == 0)
    resume_step = checkpoint_step(resume_from) if resume_from else None
    if resume_step is not None and resume_step > cfg.train.steps:
        raise ConfigError(f"{resume_from} is at step {resume_step}, past train.steps={cfg.train.steps}: raise "
                          "train.steps to continue the run, or start a fresh one in another train.run_dir")
    parts = TrainerParts(
        engine=engine, task=task, train_loader=train_loader, val_loader=val_loader, checkpointer=checkpointer,
        metrics=placement.metrics(run_dir, cfg.log.tensorboard, resume_step), device=device,
        flops_per_token=flops_per_token, peak_flops=peak_flops(device, cfg.log.peak_tflops),
        dp_size=placement.dp_size, devices=placement.world_size, console=placement.rank == 0,
    )
    trainer = Trainer(cfg, parts)
    if resume_from:
        trainer.resume(resume_from)
    return cfg, trainer
