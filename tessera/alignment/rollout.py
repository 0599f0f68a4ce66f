"""Rollouts for RL fine-tuning (PPO, GRPO): responses sampled from the policy with the KV cache,
scored by a reward model or a Python function, and the sampled tokens' log-probs recomputed.

Generation left-pads the prompts (core.generate); the rollout is laid out right-padded instead
(prompt, response, padding in every row), as DPO and the reward model read their rows: causal
attention never lets a real token see the trailing padding, positions count from 0 as in
training, and `RewardModel` and the value model take the rows without a padding mask.

Log-probs are not threaded through `generate`: one forward pass over prompt + response gives
them for old policy, new policy and reference alike, so all three come from the same
computation (an unchanged policy has a ratio of exactly 1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tessera.alignment.losses import sequence_logprobs
from tessera.alignment.reward import RewardModel
from tessera.alignment.rows import LocalRows
from tessera.core.generate import Sampling, generate_tokens
from tessera.core.model import Transformer

RewardFn = Callable[[list[int], list[int]], float]


@dataclass(frozen=True)
class Rollout:
    tokens: torch.Tensor  # (B, S) prompt, response, then pad_id
    response_mask: torch.Tensor  # (B, S) bool: True on the response tokens (a sampled eos included)
    prompt_lens: torch.Tensor  # (B,)
    prompts: list[list[int]]
    responses: list[list[int]]

    @property
    def action_mask(self) -> torch.Tensor:
        """(B, S - 1): the response tokens as predictions (position t predicts token t + 1),
        aligned with `sequence_logprobs` and with per-position values[:, :-1]."""
        return self.response_mask[:, 1:]


def generate_rollouts(policy: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      temperature: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
                      generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> Rollout:
    """Sample one response per prompt (stopping at `eos_id`) and lay them out right-padded.

    `generator` seeds the sampling: each call draws a fresh seed from it, so successive batches
    differ while a run stays reproducible. With `seeds` (one per prompt) instead, the prompts that
    share a seed (a GRPO group) are sampled as a batch of their own seeded with it, so a response
    does not depend on the other prompts of the batch, nor on how a run deals prompts to ranks.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("rollouts need a non-empty list of non-empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0: RL needs the sampling distribution's log-probs")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > policy.cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceed the "
                         f"model's max_seq_len={policy.cfg.max_seq_len}")

    def sample(batch: list[Sequence[int]], seed: int) -> list[list[int]]:
        return generate_tokens(policy, batch, max_new_tokens, sampling=Sampling(temperature=temperature),
                               stop_ids=() if eos_id is None else (eos_id,), pad_id=pad_id, seed=seed)

    if seeds is None:
        responses = sample(list(prompts), int(torch.randint(2**62, (1,), generator=generator)))
    else:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        responses = [[] for _ in prompts]
        for seed in dict.fromkeys(seeds):
            rows = [i for i, s in enumerate(seeds) if s == seed]
            for i, response in zip(rows, sample([prompts[i] for i in rows], seed)):
                responses[i] = response
    device = next(policy.parameters()).device
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor([*p, *r], device=device)
        mask[i, len(p):len(p) + len(r)] = True
    return Rollout(tokens, mask, torch.tensor([len(p) for p in prompts], device=device),
                   [list(p) for p in prompts], responses)


def policy_logprobs(model: nn.Module, tokens: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the sampled response tokens and the policy's entropy where it predicts them,
    both (B, S - 1) and 0 elsewhere. Logits are divided by the sampling temperature, so these are
    the log-probs of the distribution the tokens were drawn from."""
    logits = model(tokens) / temperature
    logp = sequence_logprobs(logits, tokens, response_mask)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) * response_mask[:, 1:]
    return logp, entropy


def gather_rollout(rows: LocalRows, rollout: Rollout, scores: torch.Tensor, pad_id: int, unit: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's `tokens`, `response_mask` and `scores`, in the order one process would hold them."""
    return (rows.gather(rollout.tokens, unit, pad=pad_id), rows.gather(rollout.response_mask, unit),
            rows.gather(scores, unit))


def first_epoch_rows(rows: LocalRows, order: torch.Tensor, size: int, shape: torch.Size, device: torch.device,
                     *per_row: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Each `per_row(indices) -> (len(indices), S - 1)` over the whole batch, computed by every rank
    on its slice of every first-epoch mini-batch (`size` rows of `order`) and summed over ranks: the
    first mini-batch's update then sees the rollout's numbers computed on exactly its rows."""
    outs = [torch.zeros(shape, device=device) for _ in per_row]
    for idx in order.split(size):
        idx = rows.mine(idx)
        for out, fn in zip(outs, per_row):
            out[idx] = fn(idx)
    return [rows.sum(out) for out in outs]


def minibatches(first_order: torch.Tensor, epochs: int, size: int, generator: torch.Generator):
    """Row indices of every mini-batch of `epochs` passes: the first pass in `first_order` (the
    order the old log-probs were computed in), later passes freshly shuffled."""
    for epoch in range(epochs):
        order = first_order if epoch == 0 else torch.randperm(len(first_order), generator=generator).to(
            first_order.device)
        yield from order.split(size)


def last_response_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of every row's last response position in (B, S - 1) action coordinates."""
    if not bool(action_mask.any(dim=1).all()):
        raise ValueError("every rollout row needs at least one response token")
    return action_mask.shape[1] - 1 - action_mask.long().flip(1).argmax(dim=1)


class RewardError(ValueError):
    """A reward that cannot train: the function raised, returned no number, or a non-finite one.
    `row` is the rollout row it happened on."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


def _reward_value(reward: RewardFn, name: str, row: int, prompt, response) -> float:
    try:
        value = reward(prompt, response)
    except Exception as e:  # noqa: BLE001 - any failure of the user's function is reported as theirs
        raise RewardError(f"{name} raised {type(e).__name__}: {e}", row) from None
    if value is None or isinstance(value, (str, bytes, bool)):
        raise RewardError(f"{name} returned {value!r}; it must return a number", row)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RewardError(f"{name} returned {value!r}; it must return a number", row) from None


@torch.no_grad()
def score(rollout: Rollout, reward: RewardModel | RewardFn) -> torch.Tensor:
    """One scalar reward per row (B,), float32: the reward model read at the last response token,
    or `reward(prompt_tokens, response_tokens)` for every row. A non-finite reward would make every
    advantage of its group (or batch, once whitened) NaN, so it is refused (RewardError), as is a
    function that raises or returns no number."""
    if isinstance(reward, RewardModel):
        reward.eval()
        values, name = reward(rollout.tokens, rollout.response_mask.long()).float(), "the reward model"
    elif callable(reward):
        name = f"rl.reward_fn {getattr(reward, '__module__', '?')}:{getattr(reward, '__qualname__', repr(reward))}"
        values = torch.tensor([_reward_value(reward, name, i, p, r)
                               for i, (p, r) in enumerate(zip(rollout.prompts, rollout.responses))],
                              dtype=torch.float32, device=rollout.tokens.device)
    else:
        raise ValueError(f"reward must be a RewardModel or a function (prompt, response) -> float, not {type(reward)}")
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{name} returned {values[bad[0]].item()} ({len(bad)} non-finite of {len(values)} "
                          "rewards); rewards must be finite", bad[0])
    return values


def merge_history(metrics: dict[str, float], history: list[dict[str, float]]) -> dict[str, float]:
    """The rollout's `metrics` with the means of the mini-batches' (`ratio_min`/`ratio_max`: extremes)."""
    for key in history[0]:
        values = [h[key] for h in history]
        metrics[key] = (min(values) if key == "ratio_min" else max(values) if key == "ratio_max"
                        else sum(values) / len(values))
    return metrics
