"""Alignment objectives against computations written out here in float64 Python, and GAE and
the PPO clip against hand-worked examples."""
import math

import pytest
import torch

from tessera.alignment.losses import (
    bradley_terry_loss, dpo_loss, gae, group_advantages, ppo_policy_loss, ppo_value_loss, sequence_logprobs, whiten,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_matches_a_float64_computation(kind, smoothing):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta, smoothing, kind)
    expected, correct = 0.0, 0
    for i in range(7):
        m = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        if kind == "ipo":
            expected += (m - 1 / (2 * beta)) ** 2
        else:  # -log sigmoid(z) = softplus(-z)
            expected += (1 - smoothing) * softplus(-beta * m) + smoothing * softplus(beta * m)
        correct += beta * (pc[i].item() - rc[i].item()) > beta * (pr[i].item() - rr[i].item())
    assert loss.item() == pytest.approx(expected / 7, rel=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(correct / 7)


def test_dpo_is_ln2_when_policy_equals_reference():
    logps = torch.randn(5, dtype=torch.float64)
    other = torch.randn(5, dtype=torch.float64)
    loss, metrics = dpo_loss(logps, other, logps, other, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert metrics["margin"].item() == 0


def test_bradley_terry_matches_a_float64_computation():
    chosen, rejected = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    expected = sum(softplus(-(c - r)) for c, r in zip(chosen.tolist(), rejected.tolist())) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(chosen.tolist(), rejected.tolist())) / 9)


def test_gae_hand_worked_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.3, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03, A1 = .03 + .72*.3; d0 = .9*.6 - .5 = .04, A0 = .04 + .72*A1
    # row 1: the third token is padding: d1 = 1 - .3 = .7; d0 = .9*.3 - .2 = .07, A0 = .07 + .72*.7
    expected = torch.tensor([[0.21712, 0.246, 0.3], [0.574, 0.7, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected + values, rtol=0, atol=1e-12)


def test_ppo_clipped_objective_hand_worked_example():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, metrics = ppo_policy_loss(logp, old, adv, torch.ones(1, 2), clip=0.2)
    # adv +1, ratio 1.5: max(-1.5, -1.2) = -1.2; adv -1, ratio .5: max(.5, .8) = .8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, rel=1e-12)
    assert metrics["clipfrac"].item() == 1.0
    inside, _ = ppo_policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), torch.ones(1, 1),
                                torch.ones(1, 1), clip=0.2)
    assert inside.item() == pytest.approx(-1.1)


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    values, old, returns = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
    # unclipped (2 - 0)^2 = 4; clipped old + .5 = 1.5 -> 2.25; the max is 4
    assert ppo_value_loss(values, old, returns, torch.ones(1, 1), clip=0.5).item() == pytest.approx(2.0)
    values = torch.tensor([[0.2]])  # moved towards the return: unclipped .04, clipped (1 - .5)^2 = .25
    assert ppo_value_loss(values, old, returns, torch.ones(1, 1), clip=0.5).item() == pytest.approx(0.125)


def test_whiten_and_group_advantages():
    x = torch.randn(4, 6, dtype=torch.float64) * 3 + 2
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    w = whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0, abs=1e-9)
    assert kept.var(unbiased=False).item() == pytest.approx(1, rel=1e-6)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 9.0])
    adv = group_advantages(rewards, 4)
    assert adv[:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    assert adv[4:].sum().item() == pytest.approx(0, abs=1e-5) and adv[7] > 0 > adv[4]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_sequence_logprobs_reads_only_masked_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    got = sequence_logprobs(logits, tokens, mask)
    for b in range(2):
        for t in range(1, 5):
            want = torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]].item() if mask[b, t] else 0.0
            assert got[b, t - 1].item() == pytest.approx(want, rel=1e-12)
