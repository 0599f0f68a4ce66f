"""What the alignment stages share as trainer tasks: the tokenizer and chat template, the model
(from `model.init_from`, with LoRA adapters when `lora.r` > 0), and in-memory loaders of encoded
samples (`core.data.samples.SampleLoader`).
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from tessera.alignment.sft_data import chat_template
from tessera.core.config import Config, ConfigError
from tessera.core.data.samples import SampleLoader
from tessera.core.lora import apply_lora
from tessera.core.task import BaseTask
from tessera.core.tokenizer import load_tokenizer


class StageTask(BaseTask):
    """The parts of a trainer task every alignment stage has in common (see core.task)."""

    val_perplexity = False
    baseline_eval = True  # fine-tuning: the starting model's validation numbers are the baseline
    token_budget = False  # whether the stage batches by data.max_tokens

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
                       collate, dp_rank: int, dp_size: int, group: Callable[[list], list] | None = None):
        t = cfg.train
        train_loader = SampleLoader(train[0], collate, t.batch_size, dp_rank, dp_size, seed=t.seed, skipped=train[1],
                                    group=group)
        val_loader = None
        if val is not None:
            val_loader = SampleLoader(val[0], collate, t.batch_size, dp_rank, dp_size, shuffle=False, epochs=1,
                                      skipped=val[1], group=group)
        return train_loader, val_loader
