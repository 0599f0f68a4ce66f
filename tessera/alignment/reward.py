"""Reward models: the language model's final hidden state at the last response token, mapped to
a scalar, trained with the Bradley-Terry loss on preference pairs (`tessera rm`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tessera.alignment.losses import bradley_terry_loss
from tessera.alignment.preference_data import collate, read_pairs
from tessera.alignment.stage import StageTask
from tessera.core.config import Config
from tessera.core.model import Transformer


class ScalarHeadModel(nn.Module):
    """A Transformer body (its LM head unused) and a linear head from its hidden states to one
    scalar per position; `body` keeps the plain model's parameter names, so a pretrained
    checkpoint loads into it and parallelism applies to it. Reward and value models are this."""

    def __init__(self, body: Transformer):
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(body.cfg.d_model, 1)
        nn.init.normal_(self.value_head.weight, std=1 / (body.cfg.d_model + 1))
        nn.init.zeros_(self.value_head.bias)

    @property
    def cfg(self):
        return self.body.cfg

    def token_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) float scalars, one per position."""
        return self.value_head(self.body.hidden_states(tokens)).squeeze(-1).float()


class RewardModel(ScalarHeadModel):
    def forward(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """One reward per row (B,), read at the row's last masked (response) token."""
        last = loss_mask.shape[1] - 1 - loss_mask.long().flip(1).argmax(dim=1)
        return self.token_values(tokens)[torch.arange(tokens.shape[0]), last]


def reward_step_loss(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rewards = model(batch["tokens"], batch["loss_mask"])
    half = rewards.shape[0] // 2
    return bradley_terry_loss(rewards[:half], rewards[half:])


class RewardTask(StageTask):
    objective = staticmethod(reward_step_loss)

    def build_model(self, cfg: Config, device: torch.device, init_weights) -> nn.Module:
        body = self.adapt(self.new_transformer(cfg, device, init_weights), cfg)
        return RewardModel(body).to(device)

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        def pairs(path: str):
            return read_pairs(path, self.tokenizer, self.template, cfg.train.seq_len, cfg.data.on_error)

        val = pairs(cfg.align.val_path) if cfg.align.val_path else None
        return self.sample_loaders(cfg, pairs(cfg.data.path), val, lambda b: collate(b, self.tokenizer.pad_id),
                                   dp_rank, dp_size)
