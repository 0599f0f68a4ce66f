"""GRPO (DeepSeekMath, Shao et al. 2024): PPO without a value model. Every prompt is answered
`group_size` times; a response's advantage is its reward against the mean and std of its own
group (`losses.group_advantages`), given to all of its tokens.

The objective per response token is PPO's clipped surrogate plus `kl_coef` times the k3
estimator of KL(pi || pi_ref), exp(ref - logp) - (ref - logp) - 1, as in DeepSeek's GRPO: the
KL is a loss term rather than a reward penalty (the group baseline would cancel a per-sequence
one), and k3 is unbiased, never negative, and low in variance when the two policies are close.
Both terms are averaged over all response tokens of a mini-batch (token-level, as DAPO does)
rather than per sequence first, so long responses are not down-weighted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.alignment.losses import group_advantages, masked_mean, ppo_policy_loss
from tessera.alignment.ppo import SHUFFLE_STREAM, GradNorm, optimizer_step, trainable_parameters
from tessera.alignment.reward import RewardModel
from tessera.alignment.rows import LocalRows
from tessera.alignment.rollout import (
    RewardFn, first_epoch_rows, gather_rollout, generate_rollouts, merge_history, minibatches, policy_logprobs,
    score,
)
from tessera.core.config import ConfigError, RLConfig
from tessera.core.engine import gradient_norm
from tessera.core.model import Transformer


def check_group_size(cfg: RLConfig) -> None:
    if cfg.group_size < 2:
        raise ConfigError(f"rl.group_size={cfg.group_size} must be >= 2: GRPO's advantages are relative to the group")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from the sampled tokens' log-probs."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass(frozen=True)
class GroupBatch:
    """One batch of groups, every rank's: `tokens`, `response_mask` (B, S); the rest in (B, S - 1)
    action coordinates."""
    tokens: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    order: torch.Tensor  # the rows' mini-batch order of the first epoch, the order they were scored in
    mini_batch_size: int


class GRPOTrainer:
    """GRPO over a policy, a frozen reference and a reward (model or function); the optimizer(s)
    come from outside and must cover the policy's trainable parameters. Models stay in eval
    mode (no dropout), so an unchanged policy reproduces its rollout log-probs exactly.

    `rows` spreads the batch over data-parallel ranks (`rows.RankRows`), each passing its share of
    the prompts and sampling their groups; one process by default. `grad_norm` as in `PPOTrainer`.
    """

    def __init__(self, policy: Transformer, reference: Transformer, reward: RewardModel | RewardFn,
                 optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], cfg: RLConfig,
                 eos_id: int | None = None, pad_id: int = 0, rows: LocalRows | None = None,
                 grad_norm: GradNorm = gradient_norm, max_grad_norm: float | None = 1.0, seed: int = 0):
        check_group_size(cfg)
        if reference is policy:
            raise ValueError("the reference must be a frozen copy of the policy, not the policy itself")
        self.policy, self.reference, self.reward = policy, reference, reward
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.cfg, self.eos_id, self.pad_id = cfg, eos_id, pad_id
        self.max_grad_norm = max_grad_norm
        self.rows = rows or LocalRows()
        self.generator = torch.Generator().manual_seed(seed + self.rows.rank)  # sampling: each rank its own
        self.shuffle = torch.Generator().manual_seed(seed ^ SHUFFLE_STREAM)  # mini-batches: shared
        self.params = trainable_parameters({"policy": policy}, self.optimizers)
        self.grad_norm = grad_norm

    @torch.no_grad()
    def collect(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None
                ) -> tuple[GroupBatch, dict[str, float]]:
        """Sample `group_size` responses per prompt of this rank's share (each group from its prompt's
        seed when `seeds` are given, see `generate_rollouts`) and score them, gather every rank's
        groups and compute their advantages; the old and reference log-probs are computed in the
        first epoch's mini-batches, so the first mini-batch sees its rollout numbers reproduced exactly."""
        cfg, rows, group = self.cfg, self.rows, self.cfg.group_size
        total = len(prompts) * group * rows.size
        mini = cfg.mini_batch_size or total
        if total % mini:
            raise ValueError(f"rl.mini_batch_size={mini} must divide prompts x rl.group_size = {total}")
        self.policy.eval()
        self.reference.eval()
        rollout = generate_rollouts(self.policy, [p for p in prompts for _ in range(group)],
                                    cfg.max_new_tokens, cfg.temperature, self.eos_id, self.pad_id, self.generator,
                                    None if seeds is None else [s for s in seeds for _ in range(group)])
        tokens, response_mask, scores = gather_rollout(rows, rollout, score(rollout, self.reward), self.pad_id, group)
        mask = response_mask[:, 1:]
        order = torch.randperm(total, generator=self.shuffle).to(mask.device)
        old_logp, ref_logp = first_epoch_rows(
            rows, order, mini, mask.shape, mask.device,
            lambda i: policy_logprobs(self.policy, tokens[i], response_mask[i], cfg.temperature)[0],
            lambda i: policy_logprobs(self.reference, tokens[i], response_mask[i], cfg.temperature)[0])
        advantages = group_advantages(scores, group)[:, None] * mask
        groups = scores.view(-1, group)
        metrics = {"reward": scores.mean().item(), "reward_std": scores.std().item(),
                   "flat_groups": (groups == groups[:, :1]).all(1).float().mean().item(),
                   "kl": ((old_logp - ref_logp) * mask).sum(1).mean().item(),
                   "response_len": mask.sum(1).float().mean().item()}
        return GroupBatch(tokens, response_mask, old_logp, ref_logp, advantages, order, mini), metrics

    def update(self, batch: GroupBatch) -> list[dict[str, float]]:
        """`epochs` passes of clipped steps with the KL term, each rank on its slice of every
        mini-batch; the metrics of every mini-batch (this rank's share of its token means)."""
        cfg, history = self.cfg, []
        for idx in minibatches(batch.order, cfg.epochs, batch.mini_batch_size, self.shuffle):
            idx = self.rows.mine(idx)
            mask = batch.response_mask[idx, 1:]
            logp, entropy = policy_logprobs(self.policy, batch.tokens[idx], batch.response_mask[idx],
                                            cfg.temperature)
            policy_loss, stats = ppo_policy_loss(logp, batch.old_logp[idx], batch.advantages[idx], mask, cfg.clip)
            kl_loss = masked_mean(k3_kl(logp, batch.ref_logp[idx]), mask)
            scale = self.rows.token_share(mask)
            stepped = optimizer_step((policy_loss + cfg.kl_coef * kl_loss) * scale, self.params, self.optimizers,
                                     self.max_grad_norm, self.grad_norm)
            ratio = torch.exp(logp - batch.old_logp[idx]).detach()[mask]
            history.append({"skipped": float(not stepped),
                            "policy_loss": policy_loss.item() * scale, "kl_loss": kl_loss.item() * scale,
                            "clipfrac": stats["clipfrac"].item() * scale,
                            "entropy": masked_mean(entropy.detach(), mask).item() * scale,
                            "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item()})
        return history

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One GRPO iteration: collect, then update.

        Metrics: `reward` (mean score), `reward_std`, `flat_groups` (the fraction of groups whose
        rewards are all equal: they have no advantage and teach nothing), `kl` (mean per-sequence
        sum of log pi - log pi_ref before the update, as PPO reports it), `response_len`;
        mini-batch means of `policy_loss`, `kl_loss` (per-token k3), `clipfrac`, `entropy`;
        `ratio_min`/`ratio_max` over all mini-batches.
        """
        batch, metrics = self.collect(prompts)
        return merge_history(metrics, self.update(batch))
