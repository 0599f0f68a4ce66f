"""GRPO: group-relative advantages, the k3 KL term, the exact first ratio, and convergence on the
checkable task of tests/rl_task.py (reward: the fraction of response tokens that are 'a')."""
import copy
import random

import pytest
import torch

from tessera.alignment.grpo import GRPOTrainer, k3_kl
from tessera.core.config import RLConfig
from rl_task import TOK, fraction_of_a, prompts, summary, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(cfg, lr=3e-3, reward=fraction_of_a):
    policy = tiny(0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    return GRPOTrainer(policy, reference, reward, opt, cfg, eos_id=TOK.eos_id, pad_id=TOK.pad_id)


def run(kl_coef, steps=30):
    rng = random.Random(0)
    grpo = trainer(RLConfig(group_size=8, mini_batch_size=16, epochs=2, max_new_tokens=8, kl_coef=kl_coef))
    return [grpo.step(prompts(8, rng)) for _ in range(steps)]


def test_grpo_raises_the_reward_while_the_kl_term_bounds_the_drift():
    history, free = run(kl_coef=0.2), run(kl_coef=0.0)
    start, end, kl = summary(history)
    kl_free = summary(free)[2]
    print(f"GRPO reward {start:.3f} -> {end:.3f}, KL {kl:.2f} nats/response (without the KL term: {kl_free:.2f})")
    assert start < 0.15
    assert end > start + 0.4
    # a policy that always answers 'a' is ~8 ln(13) = 20 nats from the near-uniform reference
    assert 0 < kl < 10
    assert kl < 0.7 * kl_free  # without the KL term the policy collapses onto 'a'


def test_k3_is_zero_at_equality_and_never_negative():
    logp, ref = -torch.rand(64), -torch.rand(64)
    assert (k3_kl(logp, logp) == 0).all()
    assert (k3_kl(logp, ref) >= 0).all()
    # unbiased: sampling from p, E[k3] = KL(p || q) for two small categoricals
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[draws], q.log()[draws]).mean()
    assert estimate.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_advantages_are_group_relative_and_the_first_ratio_is_exactly_one():
    grpo = trainer(RLConfig(group_size=4, mini_batch_size=8, epochs=1, max_new_tokens=8, kl_coef=0.04))
    batch, metrics = grpo.collect(prompts(4, random.Random(1)))
    mask = batch.response_mask[:, 1:]
    assert batch.tokens.shape[0] == 16 and metrics["flat_groups"] < 1
    assert (batch.advantages[~mask] == 0).all()
    per_row = batch.advantages.sum(1) / mask.sum(1)
    for row in range(16):  # one advantage for every token of a response
        torch.testing.assert_close(batch.advantages[row][mask[row]], per_row[row].expand(int(mask[row].sum())))
    groups = per_row.view(4, 4)
    flat = (groups == groups[:, :1]).all(1)
    torch.testing.assert_close(groups[~flat].sum(1), torch.zeros(int((~flat).sum())), atol=1e-5, rtol=0)
    history = grpo.update(batch)
    assert len(history) == 2
    assert history[0]["ratio_min"] == 1.0 and history[0]["ratio_max"] == 1.0 and history[0]["clipfrac"] == 0.0
    assert history[0]["kl_loss"] == 0.0  # the policy is still the reference
    assert history[1]["ratio_min"] != 1.0 or history[1]["ratio_max"] != 1.0


def test_bad_setups_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="group_size=1"):
        trainer(RLConfig(group_size=1))
    grpo = trainer(RLConfig(group_size=4, mini_batch_size=6))
    with pytest.raises(ValueError, match="must divide"):
        grpo.step(prompts(2, random.Random(0)))
    policy = tiny(0)
    with pytest.raises(ValueError, match="frozen copy"):
        GRPOTrainer(policy, policy, fraction_of_a, torch.optim.AdamW(policy.parameters()), RLConfig())
    with pytest.raises(ValueError, match="no optimizer steps"):
        GRPOTrainer(policy, copy.deepcopy(policy), fraction_of_a, torch.optim.AdamW([policy.tok_emb.weight]),
                    RLConfig())
    with pytest.raises(ValueError, match="RewardModel or a function"):
        trainer(RLConfig(group_size=2, max_new_tokens=2), reward="fraction").step(prompts(1, random.Random(0)))


def test_a_non_finite_gradient_never_reaches_the_weights():
    from tessera.alignment.ppo import optimizer_step

    policy = tiny(0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    params = list(policy.parameters())
    before = [p.detach().clone() for p in params]
    loss = policy(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])) * float("nan")
    assert optimizer_step(loss, params, [opt], max_grad_norm=1.0) is False
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and all(p.grad is None for p in params)
    assert optimizer_step(policy(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])), params, [opt], 1.0) is True
    assert not all(torch.equal(a, b) for a, b in zip(before, params))
