"""A save loop to kill -9 (tests/test_checkpoint_faults.py): resumes from the newest checkpoint and
the history kept up to it, then logs and checkpoints every step, pruning to the last two."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tessera.core.checkpoint import Checkpointer, checkpoint_step
from tessera.core.config import ModelConfig
from tessera.core.metrics import MetricsLogger
from tessera.core.model import Transformer


def save_loop(run: str, ready) -> None:
    torch.set_num_threads(1)
    ck = Checkpointer(f"{run}/checkpoints", keep_last=2)
    latest = ck.latest()
    start = checkpoint_step(latest) if latest else 0
    logger = MetricsLogger(run, tensorboard=False, resume_step=start if latest else None)
    model = Transformer(ModelConfig(vocab_size=13, n_layers=1, n_heads=2, d_model=32, max_seq_len=8))
    engine = SimpleNamespace(model=model, optimizer=torch.optim.AdamW(model.parameters()))
    ready.set()
    for step in range(start + 1, start + 100_000):
        logger.log(step, {"loss": 1.0 / step})
        ck.save(step, engine, {"step": step})
