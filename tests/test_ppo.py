"""PPO: rollouts, the KL-penalised reward, the adaptive KL controller, the exact first ratio, and
convergence on a checkable task: a tiny char-level policy from random init learns to answer
with the letter 'a' (reward: the fraction of response tokens that are 'a')."""
import copy
import random

import pytest
import torch

from tessera.alignment.ppo import KLController, PPOTrainer, ValueModel, token_rewards
from tessera.alignment.reward import RewardModel
from tessera.alignment.rollout import generate_rollouts, policy_logprobs, score
from tessera.core.config import RLConfig
from rl_task import TOK, fraction_of_a, prompts, summary, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(cfg, reward=fraction_of_a, lr=3e-3, policy=None, value_model=None):
    policy = policy or tiny(0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value_model = value_model or ValueModel(tiny(1))
    opt = torch.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=lr, weight_decay=0.0)
    return PPOTrainer(policy, reference, value_model, reward, opt, cfg, eos_id=TOK.eos_id, pad_id=TOK.pad_id)


def test_ppo_raises_the_reward_while_the_kl_stays_bounded():
    rng = random.Random(0)
    cfg = RLConfig(rollout_batch=32, mini_batch_size=8, epochs=2, max_new_tokens=8, kl_coef=0.05,
                    kl_target=3.0, kl_horizon=500)
    ppo = trainer(cfg)
    history = [ppo.step(prompts(32, rng)) for _ in range(30)]
    start, end, kl = summary(history)
    print(f"PPO reward {start:.3f} -> {end:.3f}, KL {kl:.2f} nats/response, kl_coef {history[-1]['kl_coef']:.3f}")
    assert start < 0.15
    assert end > start + 0.4
    # a policy that always answers 'a' is ~8 ln(13) = 20 nats from the near-uniform reference
    assert 0 < kl < 10
    assert history[-1]["kl_coef"] > cfg.kl_coef  # above target early on, so the controller raised it
    assert all(h["value_loss"] >= 0 and 0 <= h["clipfrac"] <= 1 and h["entropy"] > 0 for h in history)


def test_kl_penalised_reward_sits_at_the_last_response_token():
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    logp = -torch.rand(3, 6) * mask
    ref_logp = -torch.rand(3, 6) * mask
    scores = torch.tensor([1.0, -2.0, 0.5])
    rewards, kl = token_rewards(scores, logp, ref_logp, mask, kl_coef=0.1)
    expected = -0.1 * (logp - ref_logp) * mask
    expected[0, 3] += 1.0
    expected[1, 5] += -2.0
    expected[2, 0] += 0.5
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, (logp - ref_logp) * mask)
    assert (rewards[~mask] == 0).all()
    with pytest.raises(ValueError, match="at least one response token"):
        token_rewards(scores, logp, ref_logp, torch.zeros_like(mask), kl_coef=0.1)


def test_adaptive_kl_controller_moves_the_coefficient_towards_the_target():
    up = KLController(0.1, target=6.0, horizon=100)
    assert up.update(kl=12.0, n_samples=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +20%
    down = KLController(0.1, target=6.0, horizon=100)
    assert down.update(kl=5.4, n_samples=10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert down.update(kl=6.0, n_samples=10) == pytest.approx(down.value)  # on target: unchanged
    fixed = KLController(0.1)
    assert fixed.update(kl=100.0, n_samples=10) == 0.1


def test_rollout_masks_hold_the_response_only():
    policy = tiny(0)
    ps = [TOK.encode("ab:"), TOK.encode("abcdefg:"), TOK.encode("h:"), TOK.encode("abcd:")]
    rollout = generate_rollouts(policy, ps, max_new_tokens=6, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                                generator=torch.Generator().manual_seed(0))
    assert rollout.tokens.shape[0] == 4 and rollout.prompt_lens.tolist() == [3, 8, 2, 5]
    for i, (p, r) in enumerate(zip(ps, rollout.responses)):
        assert 1 <= len(r) <= 6 and (TOK.eos_id not in r[:-1])
        row, mask = rollout.tokens[i], rollout.response_mask[i]
        assert row[:len(p)].tolist() == p and row[len(p):len(p) + len(r)].tolist() == r
        assert (row[len(p) + len(r):] == TOK.pad_id).all()
        assert mask.tolist() == [False] * len(p) + [True] * len(r) + [False] * (len(row) - len(p) - len(r))
    assert not rollout.response_mask.all(1).any()  # rows of different lengths: padding exists
    torch.testing.assert_close(rollout.action_mask, rollout.response_mask[:, 1:])
    logp, entropy = policy_logprobs(policy, rollout.tokens, rollout.response_mask)
    assert (logp[~rollout.action_mask] == 0).all() and (logp[rollout.action_mask] < 0).all()
    assert (entropy[~rollout.action_mask] == 0).all()
    # the same seed samples the same responses; a longer prompt than the context is refused
    again = generate_rollouts(policy, ps, 6, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                              generator=torch.Generator().manual_seed(0))
    assert again.responses == rollout.responses
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_rollouts(policy, [list(range(5)) * 6], max_new_tokens=8)


def test_an_unchanged_policy_has_a_ratio_of_exactly_one():
    cfg = RLConfig(rollout_batch=16, mini_batch_size=4, epochs=1, max_new_tokens=8, kl_coef=0.1, kl_target=6.0)
    ppo = trainer(cfg)
    experience, _ = ppo.collect(prompts(16, random.Random(1)))
    history = ppo.update(experience)
    assert len(history) == 4
    assert history[0]["ratio_min"] == 1.0 and history[0]["ratio_max"] == 1.0
    assert history[0]["clipfrac"] == 0.0 and history[0]["approx_kl"] == 0.0
    assert history[1]["ratio_min"] != 1.0 or history[1]["ratio_max"] != 1.0  # the first step moved the policy


def test_ppo_with_a_reward_model_and_a_value_model_from_it():
    rm = RewardModel(tiny(2))
    cfg = RLConfig(rollout_batch=8, mini_batch_size=4, epochs=1, max_new_tokens=4, kl_coef=0.1, kl_target=6.0)
    ppo = trainer(cfg, reward=rm, value_model=ValueModel.from_reward_model(rm))
    rollout = generate_rollouts(ppo.policy, prompts(8, random.Random(2)), 4, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(score(rollout, rm), rm(rollout.tokens, rollout.response_mask.long()))
    metrics = ppo.step(prompts(8, random.Random(3)))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_bad_setups_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="must divide"):
        trainer(RLConfig(rollout_batch=10, mini_batch_size=4))
    with pytest.raises(ValueError, match="temperature"):
        RLConfig(temperature=0.0)
    policy, value_model = tiny(0), ValueModel(tiny(1))
    with pytest.raises(ValueError, match="frozen copy"):
        PPOTrainer(policy, policy, value_model, fraction_of_a, torch.optim.AdamW(policy.parameters()), RLConfig())
    with pytest.raises(ValueError, match="value_model.body"):
        PPOTrainer(policy, copy.deepcopy(policy), value_model, fraction_of_a,
                   torch.optim.AdamW(policy.parameters()), RLConfig())
    ppo = trainer(RLConfig(rollout_batch=4, mini_batch_size=2))
    with pytest.raises(ValueError, match="rollout_batch=4"):
        ppo.step(prompts(3, random.Random(0)))
