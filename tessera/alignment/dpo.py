"""Direct preference optimisation: the policy's log-ratio to a frozen reference, pushed apart
between chosen and rejected responses.

Reference log-probs come either from a frozen reference model in the same process (or on the
same mesh) at every step, or precomputed in one pass over the data (`precompute_reference`),
which frees the reference's memory for the rest of the run.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from tessera.alignment.losses import dpo_loss, sequence_logprobs
from tessera.alignment.preference_data import Pair, collate, read_pairs
from tessera.alignment.stage import StageTask
from tessera.core.config import AlignConfig, Config


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


def dpo_step_loss(policy: nn.Module, batch: dict[str, torch.Tensor], cfg: AlignConfig,
                  reference: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of one collated batch of pairs (chosen rows first, then rejected). Log-probs are
    summed over the response; IPO with `align.ipo_length_normalize` uses per-token means, as TRL
    does, so TRL's beta values carry over."""
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    elif reference is not None:
        with torch.no_grad():
            ref = response_logprobs(reference, batch).float()
    else:
        raise ValueError("DPO needs reference log-probs: precompute them or pass the reference model")
    logps = response_logprobs(policy, batch)
    if cfg.loss == "ipo" and cfg.ipo_length_normalize:  # TRL's IPO: per-token means instead of sums
        lengths = batch["loss_mask"].sum(-1).clamp(min=1).to(logps.dtype)
        logps, ref = logps / lengths, ref / lengths
    half = logps.shape[0] // 2
    return dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], cfg.beta, cfg.label_smoothing, cfg.loss)


class DPOTask(StageTask):
    """`tessera dpo`: the policy starts from `model.init_from` and the reference is the same model,
    frozen; `align.reference="precompute"` scores every pair with it once and lets it go."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.cfg = cfg.align
        self.reference: nn.Module | None = None
        self.train_pairs = self._read(cfg, cfg.data.path)
        self.val_pairs = self._read(cfg, cfg.align.val_path) if cfg.align.val_path else None

    def _read(self, cfg: Config, path: str):
        return read_pairs(path, self.tokenizer, self.template, cfg.train.seq_len, cfg.data.on_error)

    def build_model(self, cfg: Config, device: torch.device, init_weights) -> nn.Module:
        """The policy; the reference is a frozen copy of it taken before LoRA adapters."""
        policy = self.new_transformer(cfg, device, init_weights)
        self.frozen = copy.deepcopy(policy).requires_grad_(False)
        return self.adapt(policy, cfg)

    def attach(self, placement, cfg: Config, engine, init_weights) -> None:
        reference, self.frozen = placement.prepare(self.frozen, cfg), None  # precomputed: freed after scoring
        if cfg.align.reference == "model":
            self.reference = reference
            return
        for pairs in (self.train_pairs[0], self.val_pairs[0] if self.val_pairs else []):
            self._score(reference, pairs, cfg.train.batch_size, placement.device)

    @torch.no_grad()
    def _score(self, reference: nn.Module, pairs: list[Pair], batch_size: int, device: torch.device) -> None:
        """The reference's log-probs of every pair, in the same batches on every rank (sharded
        references need all ranks in step), stored in the pairs."""
        reference.eval()
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, self.tokenizer.pad_id).items()}
            logps = response_logprobs(reference, batch).float().cpu()
            for i, pair in enumerate(chunk):
                pairs[start + i] = Pair(pair.chosen, pair.rejected, (logps[i].item(), logps[len(chunk) + i].item()))

    def objective(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        return dpo_step_loss(model, batch, self.cfg, self.reference)

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        return self.sample_loaders(cfg, self.train_pairs, self.val_pairs,
                                   lambda b: collate(b, self.tokenizer.pad_id), dp_rank, dp_size)
