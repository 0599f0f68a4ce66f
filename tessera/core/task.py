"""What a run learns: its data, its models and its objective. Pretraining is one task; the
alignment stages (SFT, reward models, DPO, PPO, GRPO) are others, all handed to the same
`build_trainer` and `Trainer.fit` (the `seams.Task` protocol).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.config import Config, ConfigError
from tessera.core.data import StreamingLoader, read_manifest
from tessera.core.engine import language_model_objective
from tessera.core.model import Transformer
from tessera.core.seams import Engine, InitWeights, Placement, Update
from tessera.core.tokenizer import load_tokenizer


class BaseTask:
    """What most tasks leave as it is: one trained model, the trainer's gradient step on
    `objective`, no state of their own beyond the trainer's."""

    val_perplexity = True
    baseline_eval = False  # evaluate before the first step (a fine-tuning stage's starting point)
    static_shapes = False
    update: Update | None = None

    def __init__(self) -> None:
        self.companions: dict[str, Engine] = {}

    def check(self, cfg: Config, placement: Placement) -> None:
        """Refuse a layout the task cannot run on (the placement checks its own rules)."""

    def build_model(self, cfg: Config, device: torch.device, init_weights: InitWeights | None) -> nn.Module:
        """The trained model (a task may wrap or adapt the transformer)."""
        return self.new_transformer(cfg, device, init_weights)

    @staticmethod
    def new_transformer(cfg: Config, device: torch.device, init_weights: InitWeights | None) -> Transformer:
        model = Transformer(cfg.model).to(device)
        if init_weights is not None:
            init_weights(model)
        return model

    def attach(self, placement: Placement, cfg: Config, engine: Engine, init_weights: InitWeights | None) -> None:
        """Models besides the trained one (a reference, a reward model), placed on the same ranks."""

    objective = staticmethod(language_model_objective)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, step: int, same_layout: bool) -> None:
        """Restore what `state_dict` saved at `step`; `same_layout` is False when the data-parallel
        layout changed (the data stream then restarts at the next epoch)."""


class LanguageModelingTask(BaseTask):
    """Next-token prediction over shards prepared by `tessera data prepare`."""

    static_shapes = True  # (batch_size, seq_len) windows

    def __init__(self, cfg: Config):
        super().__init__()
        if not cfg.data.path:
            raise ConfigError("data.path is not set: point it at a directory made by `tessera data prepare`")
        if not Path(cfg.data.path).is_dir():
            raise ConfigError(f"data.path={cfg.data.path!r} does not exist: run `tessera data prepare --out {cfg.data.path}`")
        manifest = read_manifest(cfg.data.path)
        tokenizer = load_tokenizer(cfg.data.tokenizer or manifest.tokenizer_path)
        self.manifest = read_manifest(cfg.data.path, tokenizer.hash)  # refuses data of another tokenizer
        self.vocab_size = self.manifest.vocab_size
        self.tokenizer_files = (self.manifest.tokenizer_path, self.manifest.root / "tokenizer_config.json")

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        t = cfg.train
        train = StreamingLoader(
            self.manifest, "train", t.batch_size, t.seq_len, dp_rank, dp_size, cfg.data.num_workers,
            seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
        )
        val = None
        if "val" in self.manifest.splits:
            val = StreamingLoader(self.manifest, "val", t.batch_size, t.seq_len, dp_rank, dp_size,
                                  shuffle=False, on_error=cfg.data.on_error, epochs=1)
        return train, val
