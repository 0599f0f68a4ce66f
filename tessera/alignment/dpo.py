"""Direct preference optimisation: the policy's log-ratio to a frozen reference, pushed apart
between chosen and rejected responses.

Reference log-probs come either from a frozen reference model in the same process (or on the
same mesh) at every step, or precomputed in one pass over the data (`precompute_reference`),
which frees the reference's memory for the rest of the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tessera.alignment.losses import dpo_loss, sequence_logprobs


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0  # > 0: conservative DPO
    loss: str = "sigmoid"  # or "ipo"


def response_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of the response tokens of every row (2B,). Rows are right-padded, so
    causal attention never lets a real token see padding."""
    logits = model(batch["tokens"])
    return sequence_logprobs(logits, batch["tokens"], batch["loss_mask"]).sum(-1)


@torch.no_grad()
def precompute_reference(reference: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Store the reference model's log-probs in each batch (`ref_logps`), once."""
    reference.eval()
    for batch in batches:
        batch["ref_logps"] = response_logprobs(reference, batch).float()


def dpo_step_loss(policy: nn.Module, batch: dict[str, torch.Tensor], cfg: DPOConfig,
                  reference: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of one collated batch of pairs (chosen rows first, then rejected)."""
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    elif reference is not None:
        with torch.no_grad():
            ref = response_logprobs(reference, batch).float()
    else:
        raise ValueError("DPO needs reference log-probs: precompute them or pass the reference model")
    logps = response_logprobs(policy, batch)
    half = logps.shape[0] // 2
    return dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], cfg.beta, cfg.label_smoothing, cfg.loss)
