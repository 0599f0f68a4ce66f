"""What a run learns: its data, its model and its objective. Pretraining is one task; the
alignment stages (SFT, reward models, DPO) are others, built on the same trainer, engines,
placements and checkpoints by `build_trainer`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.config import Config, ConfigError
from tessera.core.data import StreamingLoader, read_manifest
from tessera.core.engine import language_model_objective
from tessera.core.model import Transformer
from tessera.core.tokenizer import load_tokenizer


class LanguageModelingTask:
    """Next-token prediction over shards prepared by `tessera data prepare`.

    The interface every task offers: `vocab_size`, `tokenizer_files` (copied into checkpoints),
    `val_perplexity`, `build_model`, `attach` (models besides the trained one, e.g. DPO's
    reference, placed on the same ranks), `objective` and `loaders`.
    """

    val_perplexity = True

    def __init__(self, cfg: Config):
        if not cfg.data.path:
            raise ConfigError("data.path is not set: point it at a directory made by `tessera data prepare`")
        if not Path(cfg.data.path).is_dir():
            raise ConfigError(f"data.path={cfg.data.path!r} does not exist: run `tessera data prepare --out {cfg.data.path}`")
        manifest = read_manifest(cfg.data.path)
        tokenizer = load_tokenizer(cfg.data.tokenizer or manifest.tokenizer_path)
        self.manifest = read_manifest(cfg.data.path, tokenizer.hash)  # refuses data of another tokenizer
        self.vocab_size = self.manifest.vocab_size
        self.tokenizer_files = (self.manifest.tokenizer_path, self.manifest.root / "tokenizer_config.json")

    def build_model(self, cfg: Config, device: torch.device,
                    init_weights: Callable[[Transformer], None] | None) -> nn.Module:
        model = Transformer(cfg.model).to(device)
        if init_weights is not None:
            init_weights(model)
        return model

    def attach(self, placement, cfg: Config, init_weights) -> None:
        """Nothing besides the trained model."""

    objective = staticmethod(language_model_objective)

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
