"""Reward model and DPO on a checkable preference: answers in capitals beat the same answer in
lower case. Held-out pairs use words never seen in training."""
import copy
import random

import pytest
import torch

from tessera.alignment.dpo import dpo_step_loss, precompute_reference
from tessera.alignment.preference_data import collate, encode_pair
from tessera.alignment.reward import RewardModel, reward_step_loss
from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE
from tessera.core.config import AlignConfig, ModelConfig
from tessera.core.model import Transformer
from tessera.core.tokenizer import train_char

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def task():
    tok = train_char([LETTERS + LETTERS.upper() + DEFAULT_CHAT_TEMPLATE + "say:#\n "])
    train_words, held_out = words(160, 0), words(60, 1)
    held_out = [w for w in held_out if w not in set(train_words)]

    def batches(ws, size):
        pairs = [encode_pair(tok, DEFAULT_CHAT_TEMPLATE, {"prompt": f"say {w}", "chosen": w.upper(), "rejected": w},
                             seq_len=48) for w in ws]
        return [collate(pairs[i:i + size], tok.pad_id) for i in range(0, len(pairs), size)]

    return tok, batches(train_words, 16), batches(held_out, 64)


def tiny(vocab, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, norm="rmsnorm",
                                   pos="rope", mlp="swiglu", d_ff=96, max_seq_len=64))


def train(params, loss_fn, batches, epochs, lr):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        for batch in batches:
            loss, _ = loss_fn(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()


def test_reward_model_learns_the_preference(task):
    tok, train_batches, held_out = task
    rm = RewardModel(tiny(tok.vocab_size))
    before = reward_step_loss(rm, held_out[0])[1]["accuracy"].item()
    train(rm.parameters(), lambda b: reward_step_loss(rm, b), train_batches, epochs=3, lr=3e-3)
    with torch.no_grad():
        _, metrics = reward_step_loss(rm, held_out[0])
    assert metrics["accuracy"].item() >= 0.9, (before, metrics)


def test_dpo_raises_held_out_preference_accuracy_and_margin(task):
    tok, train_batches, held_out = task
    policy = tiny(tok.vocab_size)
    reference = copy.deepcopy(policy).requires_grad_(False)
    cfg = AlignConfig(beta=0.5)
    precompute_reference(reference, train_batches)
    with torch.no_grad():
        start_loss, start = dpo_step_loss(policy, held_out[0], cfg, reference)
    assert start_loss.item() == pytest.approx(0.6931, abs=1e-3)  # ln 2: policy == reference
    train(policy.parameters(), lambda b: dpo_step_loss(policy, b, cfg), train_batches, epochs=3, lr=3e-3)
    with torch.no_grad():
        _, end = dpo_step_loss(policy, held_out[0], cfg, reference)
    assert end["accuracy"].item() >= 0.9, end
    assert end["margin"].item() > start["margin"].item() + 1.0


@pytest.mark.parametrize("kind, smoothing", [("ipo", 0.0), ("sigmoid", 0.1)])
def test_dpo_variants_train_too(task, kind, smoothing):
    tok, train_batches, held_out = task
    policy = tiny(tok.vocab_size, seed=1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    cfg = AlignConfig(beta=0.5, loss=kind, label_smoothing=smoothing)
    train(policy.parameters(), lambda b: dpo_step_loss(policy, b, cfg, reference), train_batches[:6], epochs=2, lr=3e-3)
    with torch.no_grad():
        _, end = dpo_step_loss(policy, held_out[0], cfg, reference)
    assert end["accuracy"].item() >= 0.8, end


def test_ipo_length_normalized_uses_per_token_means_like_trl(monkeypatch):
    """TRL's IPO averages the response log-probs over their tokens; the margin and the loss then follow
    (float64 reference written out here)."""
    import tessera.alignment.dpo as dpo

    torch.manual_seed(0)
    logps, ref = torch.randn(4, dtype=torch.float64) * 5, torch.randn(4, dtype=torch.float64) * 5
    lengths = torch.tensor([3.0, 7.0, 5.0, 2.0], dtype=torch.float64)
    mask = (torch.arange(9)[None, :] < lengths[:, None]).double()
    monkeypatch.setattr(dpo, "response_logprobs", lambda model, batch: logps)  # summed log-probs of 4 rows
    for normalize in (False, True):
        loss, _ = dpo_step_loss(None, {"ref_logps": ref, "loss_mask": mask},
                                AlignConfig(beta=0.1, loss="ipo", ipo_length_normalize=normalize))
        p, r = (logps / lengths, ref / lengths) if normalize else (logps, ref)
        margin = (p[:2] - r[:2]) - (p[2:] - r[2:])
        torch.testing.assert_close(loss, ((margin - 1 / (2 * 0.1)) ** 2).mean())
