"""The objectives of the alignment stages, as pure functions of log-probabilities and rewards.

Kept apart from the stages that call them so each can be checked against an independent
computation: DPO and its conservative (label-smoothed) and IPO variants, the Bradley-Terry
reward-model loss, PPO's clipped policy and value losses, GAE, advantage whitening and GRPO's
group-relative advantages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p(tokens[:, t] | tokens[:, :t]) where loss_mask[:, t], else 0: shape (B, S - 1).

    `logits` (B, S, vocab) are the model's outputs for `tokens` (B, S); position t predicts t + 1.
    """
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return picked * loss_mask[:, 1:].to(picked.dtype)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             kind: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on summed response log-probs (B,). `label_smoothing` > 0 is conservative DPO (labels
    flipped with that probability); `kind="ipo"` regresses the log-ratio margin to 1 / (2 beta)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; valid: sigmoid, ipo")
    chosen_reward = beta * (policy_chosen - ref_chosen).detach()
    rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    metrics = {
        "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
        "margin": (chosen_reward - rejected_reward).mean(),
        "accuracy": (chosen_reward > rejected_reward).float().mean(),
    }
    return losses.mean(), metrics


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_chosen - r_rejected), with the pair accuracy and mean margin."""
    diff = chosen - rejected
    return -F.logsigmoid(diff).mean(), {"accuracy": (diff > 0).float().mean(), "margin": diff.detach().mean()}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (and zero mean when `shift_mean`). The
    variance is the biased (population) one; TRL's `masked_whiten` uses the unbiased one, a factor
    n / (n - 1) that is negligible at rollout sizes but shows in exact comparisons."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over (B, T) response tokens; the value after
    the last valid token is 0 (the episode ends with the response)."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, advantages + values


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over the masked tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"clipfrac": clipfrac.detach(), "approx_kl": masked_mean(old_logp - logp, mask).detach()}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Clipped value loss: the worse of the new value and the old one moved at most `clip`."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: each sample's reward against the mean and (unbiased) std of the samples of the same
    prompt (rows are grouped consecutively, `group_size` per prompt). The std is offset by 1e-6
    where TRL adds 1e-4: groups of near-equal rewards get larger advantages here."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + 1e-6)).view(-1)
