"""Assemble a training run from a Config: device, tokenizer, data, model, engine, trainer.

This is the one place that wires the pieces together; each piece knows only its own inputs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from tessera import kernels
from tessera.core.checkpoint import Checkpointer, checkpoint_step
from tessera.core.config import Config, ConfigError, to_toml
from tessera.core.data import DataError, StreamingLoader, read_manifest
from tessera.core.engine import LocalEngine
from tessera.core.metrics import MetricsLogger, peak_flops
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer
from tessera.core.tokenizer import load_tokenizer
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


def load_data(cfg: Config):
    """The manifest of data.path, checked against the run's tokenizer (data.tokenizer, else the data's own)."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a directory made by `tessera data prepare`")
    if not Path(cfg.data.path).is_dir():
        raise ConfigError(f"data.path={cfg.data.path!r} does not exist: run `tessera data prepare --out {cfg.data.path}`")
    manifest = read_manifest(cfg.data.path)
    tokenizer = load_tokenizer(cfg.data.tokenizer or manifest.tokenizer_path)
    return read_manifest(cfg.data.path, tokenizer.hash)


def check_single_process_layout(cfg: Config) -> None:
    """`tessera train` runs one process for now; a layout that needs more ranks is refused, not ignored."""
    p = cfg.parallel
    ranks = p.dp_replicate * max(p.dp_shard, 1) * p.tp
    if ranks > 1:
        raise ConfigError(f"parallel layout dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} "
                          f"needs {ranks} ranks; `tessera train` runs a single process (valid here: dp_replicate=1, dp_shard=1 or -1, tp=1)")
    if p.engine != "fsdp":
        raise ConfigError(f"parallel.engine={p.engine!r} is not available yet; valid: fsdp")
    if p.activation_checkpoint != "none" or p.mixed_precision != "none":
        raise ConfigError("parallel.activation_checkpoint and parallel.mixed_precision are not applied by "
                          "single-process `tessera train` yet; valid: 'none' (use train.precision='bf16')")


def resume_path(resume: str, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint that checkpoint.resume names: none, the newest complete one ("auto"), or a path."""
    if resume == "auto":
        return checkpointer.latest()
    if resume and not (Path(resume) / "trainer_state.pt").exists():
        raise ConfigError(f"checkpoint.resume={resume!r} is not a checkpoint directory; valid: '', 'auto', a path")
    return Path(resume) if resume else None


def build_trainer(cfg: Config, rank: int = 0, world_size: int = 1) -> tuple[Config, Trainer]:
    """A ready-to-fit Trainer (resumed when checkpoint.resume asks for it) and the final config."""
    check_single_process_layout(cfg)
    kernels.configure(cfg.kernels.backend, **cfg.kernels.overrides())
    device = resolve_device(cfg.train.device)
    if device.type == "cpu" and "triton" in kernels.dispatch.current().values() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels backend 'triton' on CPU runs only under Triton's interpreter: start with "
                          "TRITON_INTERPRET=1 (slow, for testing); valid on CPU otherwise: auto, torch")
    manifest = load_data(cfg)
    cfg = with_vocab(cfg, manifest.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    engine = LocalEngine(model, optimizer, device, cfg.train.precision, cfg.train.compile)
    t = cfg.train
    train_loader = StreamingLoader(
        manifest, "train", t.batch_size, t.seq_len, rank, world_size, cfg.data.num_workers,
        seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
    )
    val_loader = None
    if "val" in manifest.splits:
        val_loader = StreamingLoader(manifest, "val", t.batch_size, t.seq_len, rank, world_size,
                                     shuffle=False, on_error=cfg.data.on_error, epochs=1)
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                attachments=(manifest.tokenizer_path, manifest.root / "tokenizer_config.json"))
    resume_from = resume_path(cfg.checkpoint.resume, checkpointer)
    resume_step = checkpoint_step(resume_from) if resume_from else None
    parts = TrainerParts(
        engine=engine, train_loader=train_loader, val_loader=val_loader, checkpointer=checkpointer,
        metrics=MetricsLogger(run_dir, cfg.log.tensorboard, resume_step), device=device,
        flops_per_token=model.flops_per_token(t.seq_len), peak_flops=peak_flops(device, cfg.log.peak_tflops),
    )
    trainer = Trainer(cfg, parts)
    if resume_from:
        trainer.resume(resume_from)
    return cfg, trainer


__all__ = ["DataError", "build_trainer", "resolve_device"]
