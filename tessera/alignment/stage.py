"""What the alignment stages share as trainer tasks: the tokenizer and chat template, the model
(from `model.init_from`, with LoRA adapters when `lora.r` > 0), and an in-memory loader of
encoded samples that deals them to data-parallel ranks and resumes like the pretraining loader.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tessera.alignment.lora import apply_lora
from tessera.alignment.sft_data import chat_template
from tessera.core.config import Config, ConfigError
from tessera.core.task import BaseTask
from tessera.core.tokenizer import load_tokenizer


class SampleLoader:
    """Batches of encoded samples, reshuffled every epoch; each data-parallel rank takes every
    `world_size`-th sample of the epoch's order (all ranks the same number of batches).

    The state is two integers, so a resumed run replays the same batches; `epochs=None` repeats
    forever (training), `epochs=1` is one pass in a fixed order (validation).
    """

    num_workers = 0

    def __init__(self, samples: list, collate: Callable[[list], dict], batch_size: int, rank: int, world_size: int,
                 seed: int = 0, shuffle: bool = True, epochs: int | None = None, skipped: int = 0):
        self.per_rank = len(samples) // world_size // batch_size
        if self.per_rank == 0:
            raise ConfigError(f"{len(samples)} samples make no batch of {batch_size} on each of {world_size} "
                              "rank(s): lower train.batch_size or add data")
        self.samples, self.collate, self.batch_size = samples, collate, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.epochs, self.skipped = shuffle, epochs, skipped
        self.epoch = self.batch = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        return torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            mine = self._order(self.epoch)[self.rank::self.world_size]
            while self.batch < self.per_rank:
                start = self.batch * self.batch_size
                self.batch += 1
                yield self.collate([self.samples[i] for i in mine[start:start + self.batch_size]])
            self.epoch, self.batch = self.epoch + 1, 0

    def reset(self) -> None:
        self.epoch = self.batch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "num_workers": 0, "seed": self.seed}

    def resumable_from(self, state: dict) -> bool:
        return state["world_size"] == self.world_size and state["seed"] == self.seed

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


class StageTask(BaseTask):
    """The parts of a trainer task every alignment stage has in common (see core.task)."""

    val_perplexity = False
    baseline_eval = True  # fine-tuning: the starting model's validation numbers are the baseline

    def __init__(self, cfg: Config):
        super().__init__()
        if not cfg.data.path or not Path(cfg.data.path).is_file():
            raise ConfigError(f"data.path={cfg.data.path!r} must be a JSONL file of this stage's records")
        source = cfg.data.tokenizer
        if not source:
            raise ConfigError("no tokenizer: set data.tokenizer, or model.init_from to a checkpoint or "
                              "Hugging Face directory that carries one")
        self.tokenizer = load_tokenizer(source)
        tokenizer_dir = Path(source) if Path(source).is_dir() else Path(source).parent
        self.template = chat_template(tokenizer_dir)
        self.vocab_size = self.tokenizer.vocab_size
        self.tokenizer_files = tuple(p for p in (tokenizer_dir / "tokenizer.json", tokenizer_dir / "tokenizer_config.json")
                                     if p.exists())

    def adapt(self, model: nn.Module, cfg: Config) -> nn.Module:
        """LoRA adapters on the model's linear layers when `lora.r` > 0 (base weights frozen)."""
        return apply_lora(model, cfg.lora) if cfg.lora.r > 0 else model

    def sample_loaders(self, cfg: Config, train: tuple[list, int], val: tuple[list, int] | None,
                       collate, dp_rank: int, dp_size: int):
        t = cfg.train
        train_loader = SampleLoader(train[0], collate, t.batch_size, dp_rank, dp_size, seed=t.seed, skipped=train[1])
        val_loader = None
        if val is not None:
            val_loader = SampleLoader(val[0], collate, t.batch_size, dp_rank, dp_size, shuffle=False, epochs=1,
                                      skipped=val[1])
        return train_loader, val_loader
