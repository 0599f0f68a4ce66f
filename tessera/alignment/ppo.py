"""PPO for RLHF (Ziegler et al. 2019, InstructGPT): sample responses, score them, penalise each
token's divergence from a frozen reference, estimate advantages with a value model (GAE), and
take several clipped policy/value steps on mini-batches of every rollout batch.

The value model is separate from the policy (`ValueModel`: a Transformer body with a per-token
scalar head), as in InstructGPT, rather than a head on the policy body: the value loss then
cannot pull the policy's features, it can start from the reward model (`from_reward_model`),
and policy, reference, reward and value models are four plain modules that parallelism
spreads alike. The cost is a second forward and backward per mini-batch.

Models stay in eval mode throughout (no dropout), so that an unchanged policy reproduces its
rollout log-probs exactly.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tessera.alignment.losses import gae, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from tessera.alignment.reward import RewardModel, ScalarHeadModel
from tessera.alignment.rows import LocalRows
from tessera.alignment.rollout import (
    RewardFn, first_epoch_rows, gather_rollout, generate_rollouts, last_response_index, merge_history, minibatches,
    policy_logprobs, score,
)
from tessera.core.config import RLConfig
from tessera.core.engine import gradient_norm, scale_gradients_to
from tessera.core.model import Transformer

SHUFFLE_STREAM = 0x5EED_5EED  # the mini-batch order's generator is seeded apart from the sampling one


class KLController:
    """The KL coefficient: fixed when `target` is None, else Ziegler et al.'s adaptive controller,
    which moves it proportionally to the relative error of the measured KL (clipped to +-20%),
    scaled by the samples seen over `horizon`."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_samples / self.horizon
        return self.value


class ValueModel(ScalarHeadModel):
    """Per-token values: the value at t is that of the state before token t + 1."""

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> ValueModel:
        """A value model starting from a copy of the reward model's body and head (InstructGPT)."""
        model = cls(copy.deepcopy(reward_model.body))
        model.value_head.load_state_dict(reward_model.value_head.state_dict())
        return model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_values(tokens)


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, action_mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, S - 1): -kl_coef * (log pi - log pi_ref) at every response token and
    the sequence's score added at its last one; also the per-token KL estimate itself."""
    kl = (logp - ref_logp) * action_mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_response_index(action_mask)] += scores
    return rewards, kl


def trainable_parameters(models: dict[str, nn.Module], optimizers: Sequence[torch.optim.Optimizer]
                         ) -> list[nn.Parameter]:
    """The models' trainable parameters; ValueError naming any that no optimizer steps."""
    stepped = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    params, missing = [], []
    for who, model in models.items():
        for name, p in model.named_parameters():
            if p.requires_grad:
                params.append(p)
                if id(p) not in stepped:
                    missing.append(f"{who}.{name}")
    if missing:
        more = " ..." if len(missing) > 4 else ""
        raise ValueError(f"no optimizer steps these trainable parameters: {missing[:4]}{more}")
    return params


GradNorm = Callable[[list[nn.Parameter]], torch.Tensor]  # parameters -> the L2 norm of their gradients


def optimizer_step(loss: torch.Tensor, params: list[nn.Parameter], optimizers: Sequence[torch.optim.Optimizer],
                   max_grad_norm: float | None, grad_norm: GradNorm = gradient_norm) -> bool:
    """Backward, then all gradients scaled together to a global norm of at most `max_grad_norm`
    and stepped. A non-finite gradient norm (every rank measures the same one) skips the step, so
    no NaN reaches the weights; returns whether the optimizers stepped."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    with_grad = [p for p in params if p.grad is not None]
    norm = grad_norm(with_grad)
    if not torch.isfinite(norm):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return False
    if max_grad_norm is not None:
        scale_gradients_to(with_grad, norm, max_grad_norm)
    for opt in optimizers:
        opt.step()
    return True


@dataclass(frozen=True)
class Experience:
    """One rollout batch, every rank's rows, with everything the PPO epochs need, in (B, S - 1)
    action coordinates except `tokens` and `response_mask` (B, S)."""
    tokens: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    order: torch.Tensor  # the rows' mini-batch order of the first epoch, the order they were scored in


class PPOTrainer:
    """PPO over a policy, a frozen reference, a value model and a reward (model or function).

    The optimizer(s) come from outside and must cover the trainable parameters of the policy
    and the value model (one optimizer over both, or one each); with LoRA only the adapters are
    trainable, and only they are clipped and stepped. `rows` spreads the batch over data-parallel
    ranks (`rows.RankRows`), each passing its share of the prompts; one process by default.
    `grad_norm` measures gradients however the models are spread (the placement's `grad_norm`).
    """

    def __init__(self, policy: Transformer, reference: Transformer, value_model: ValueModel,
                 reward: RewardModel | RewardFn, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                 cfg: RLConfig, eos_id: int | None = None, pad_id: int = 0, rows: LocalRows | None = None,
                 grad_norm: GradNorm = gradient_norm, max_grad_norm: float | None = 1.0, seed: int = 0):
        if reference is policy:
            raise ValueError("the reference must be a frozen copy of the policy, not the policy itself")
        self.policy, self.reference, self.value_model, self.reward = policy, reference, value_model, reward
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.cfg, self.eos_id, self.pad_id = cfg, eos_id, pad_id
        self.mini_batch_size = cfg.mini_batch(grouped=False)
        self.max_grad_norm = max_grad_norm
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
        self.rows = rows or LocalRows()
        self.generator = torch.Generator().manual_seed(seed + self.rows.rank)  # sampling: each rank its own
        self.shuffle = torch.Generator().manual_seed(seed ^ SHUFFLE_STREAM)  # mini-batches: shared
        self.params = trainable_parameters({"policy": policy, "value_model": value_model}, self.optimizers)
        self.grad_norm = grad_norm

    @torch.no_grad()
    def collect(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None
                ) -> tuple[Experience, dict[str, float]]:
        """Generate (from a seed per prompt when `seeds` are given) and score this rank's share of
        one rollout batch, then gather every rank's rows; old log-probs, reference log-probs and
        values are computed in the first epoch's mini-batches, so that the first mini-batch sees
        its rollout numbers reproduced exactly."""
        cfg, rows = self.cfg, self.rows
        if len(prompts) * rows.size != cfg.rollout_batch:
            raise ValueError(f"got {len(prompts)} prompts on each of {rows.size} rank(s); "
                             f"rl.rollout_batch={cfg.rollout_batch}")
        for m in (self.policy, self.reference, self.value_model):
            m.eval()
        rollout = generate_rollouts(self.policy, prompts, cfg.max_new_tokens, cfg.temperature, self.eos_id,
                                    self.pad_id, self.generator, seeds)
        tokens, response_mask, scores = gather_rollout(rows, rollout, score(rollout, self.reward), self.pad_id)
        action_mask = response_mask[:, 1:]
        order = torch.randperm(cfg.rollout_batch, generator=self.shuffle).to(tokens.device)
        logp, ref_logp, values = first_epoch_rows(
            rows, order, self.mini_batch_size, action_mask.shape, tokens.device,
            lambda i: policy_logprobs(self.policy, tokens[i], response_mask[i], cfg.temperature)[0],
            lambda i: policy_logprobs(self.reference, tokens[i], response_mask[i], cfg.temperature)[0],
            lambda i: self.value_model(tokens[i])[:, :-1])
        rewards, kl = token_rewards(scores, logp, ref_logp, action_mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, values, action_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, action_mask) * action_mask
        metrics = {"reward": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
                   "kl": kl.sum(1).mean().item(), "kl_coef": self.kl_ctl.value,
                   "response_len": action_mask.sum(1).float().mean().item()}
        return Experience(tokens, response_mask, logp, values, advantages, returns, order), metrics

    def update(self, exp: Experience) -> list[dict[str, float]]:
        """`epochs` passes of clipped policy and value steps, each rank on its slice of every
        mini-batch; the metrics of every mini-batch (this rank's share of its token means)."""
        cfg, history = self.cfg, []
        for idx in minibatches(exp.order, cfg.epochs, self.mini_batch_size, self.shuffle):
            history.append(self._minibatch(exp, self.rows.mine(idx)))
        return history

    def _minibatch(self, exp: Experience, idx: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        tokens, response_mask = exp.tokens[idx], exp.response_mask[idx]
        mask = response_mask[:, 1:]
        logp, entropy = policy_logprobs(self.policy, tokens, response_mask, cfg.temperature)
        values = self.value_model(tokens)[:, :-1]
        policy_loss, stats = ppo_policy_loss(logp, exp.old_logp[idx], exp.advantages[idx], mask, cfg.clip)
        value_loss = ppo_value_loss(values, exp.old_values[idx], exp.returns[idx], mask, cfg.value_clip)
        scale = self.rows.token_share(mask)
        stepped = optimizer_step((policy_loss + cfg.vf_coef * value_loss) * scale, self.params, self.optimizers,
                                 self.max_grad_norm, self.grad_norm)
        ratio = torch.exp(logp - exp.old_logp[idx]).detach()[mask]
        return {"skipped": float(not stepped),
                "policy_loss": policy_loss.item() * scale, "value_loss": value_loss.item() * scale,
                "clipfrac": stats["clipfrac"].item() * scale, "approx_kl": stats["approx_kl"].item() * scale,
                "entropy": masked_mean(entropy.detach(), mask).item() * scale,
                "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item()}

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One PPO iteration: collect, update, then move the KL coefficient by the rollout's KL.

        Metrics: rollout `reward` (mean score), `reward_std`, `kl` (mean per-sequence sum of
        log pi - log pi_ref over the response, before the update), `kl_coef` (the one used),
        `response_len`; mini-batch means of `policy_loss`, `value_loss`, `clipfrac`, `approx_kl`,
        `entropy`; `ratio_min`/`ratio_max` over all mini-batches.
        """
        exp, metrics = self.collect(prompts)
        metrics = merge_history(metrics, self.update(exp))
        self.kl_ctl.update(metrics["kl"], self.cfg.rollout_batch)
        return metrics
