"""Supervised fine-tuning (instruction tuning) as a trainer task: packed instruction samples,
the loss on response tokens only, samples of a row kept apart by document ids; batched by
sample rows or by a token budget (`data.max_tokens`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tessera.alignment.sft_data import pack, read_sft
from tessera.alignment.stage import StageTask
from tessera.core.config import Config


def sft_objective(model: nn.Module, batch: dict[str, torch.Tensor]):
    """Mean cross-entropy over the response tokens of the packed rows."""
    return model(batch["inputs"], batch["targets"], positions=batch["positions"], doc_ids=batch["doc_ids"]), {}


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class SFTTask(StageTask):
    val_perplexity = True  # the loss is a per-token NLL of responses
    token_budget = True
    objective = staticmethod(sft_objective)

    def build_model(self, cfg: Config, device: torch.device, init_weights) -> nn.Module:
        return self.adapt(self.new_transformer(cfg, device, init_weights), cfg)

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        """Rows of train.seq_len packed once; or with data.max_tokens, every epoch's shuffled samples
        packed into rows of that budget, one per micro-batch (each sample once per epoch)."""
        seq_len, pad, budget = cfg.train.seq_len, self.tokenizer.pad_id, cfg.data.max_tokens

        def rows(path: str) -> tuple[list, int]:
            samples, skipped = read_sft(path, self.tokenizer, self.template, seq_len, cfg.data.on_error)
            return (samples if budget else pack(samples, seq_len, pad)), skipped

        group = (lambda samples: pack(samples, budget, pad)) if budget else None
        val = rows(cfg.align.val_path) if cfg.align.val_path else None
        return self.sample_loaders(cfg, rows(cfg.data.path), val, stack, dp_rank, dp_size, group)
