"""Language-model fine-tuning with LoRA: `tessera train` with `lora.r` > 0 (continued pretraining
of a model from `model.init_from` on new text, the adapters alone trained)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tessera.core.config import Config
from tessera.core.lora import apply_lora
from tessera.core.seams import InitWeights
from tessera.core.task import LanguageModelingTask


class LoRALanguageModelingTask(LanguageModelingTask):
    """Next-token prediction on prepared shards with the base weights frozen and adapters on the
    `lora.targets` layers; the starting model's validation loss is logged first as the baseline."""

    baseline_eval = True

    def build_model(self, cfg: Config, device: torch.device, init_weights: InitWeights | None) -> nn.Module:
        return apply_lora(self.new_transformer(cfg, device, init_weights), cfg.lora)
