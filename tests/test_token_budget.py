"""Token-budget batching (`data.max_tokens`): each SFT micro-batch is one row of whole samples
totalling at most the budget, kept apart by document masks (its loss is the per-sample losses'
sum, against a float64 one-sample-at-a-time reference), every sample once per epoch, resumed
exactly; impossible settings are refused."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from tessera.alignment.sft import SFTTask, stack
from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE, IGNORE, Sample, pack
from tessera.alignment.stage import SampleLoader
from tessera.core.build import build_trainer
from tessera.core.config import ConfigError, ModelConfig, load_config
from tessera.core.metrics import read_metrics
from tessera.core.model import Transformer
from tessera.core.tokenizer import train_char

VOCAB, PAD, CONTEXT, BUDGET = 61, 0, 24, 70  # the budget exceeds the model's context: positions restart per sample


def samples(n: int, seed: int) -> list[Sample]:
    """Samples of random lengths 3..CONTEXT+1, the first token unique (its identity), a response suffix."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, CONTEXT + 1)
        prompt = rng.randint(1, length - 1)
        tokens = [i + 1] + [rng.randrange(1, VOCAB) for _ in range(length - 1)]
        out.append(Sample(tokens, [0] * prompt + [1] * (length - prompt)))
    return out


def loader(data, seed=0, rank=0, world=1):
    return SampleLoader(data, stack, 1, rank, world, seed=seed, group=lambda s: pack(s, BUDGET, PAD))


def documents(batch: dict) -> list[tuple[int, int]]:
    """(sample identity, tokens) of every document of a one-row batch, padding left out."""
    doc_ids, inputs = batch["doc_ids"][0], batch["inputs"][0]
    out = []
    for d in doc_ids.unique().tolist():
        where = doc_ids == d
        if (batch["targets"][0][where] != IGNORE).any():  # padding has no targets
            out.append((int(inputs[where][0]), int(where.sum())))
    return out


def test_every_sample_once_per_epoch_and_no_batch_over_the_budget():
    data = samples(40, 1)
    lo = loader(data)
    batches = iter(lo)
    compositions = []
    for epoch in range(2):
        seen = []
        for _ in range(lo.per_rank(lo.items(epoch))):
            batch = next(batches)
            assert batch["inputs"].shape == (1, BUDGET)
            docs = documents(batch)
            assert sum(n for _, n in docs) <= BUDGET
            seen += [ident for ident, _ in docs]
        assert sorted(seen) == list(range(1, 41))  # each sample exactly once
        compositions.append(seen)
    assert compositions[0] != compositions[1]  # reshuffled and repacked every epoch
    assert sum(len(s.tokens) - 1 for s in data) / (len(lo.items(0)) * BUDGET) > 0.8  # first fit wastes little


def test_two_ranks_share_an_epoch_without_overlap():
    data = samples(41, 2)
    parts = [loader(data, seed=3, rank=r, world=2) for r in range(2)]
    seen = []
    for p in parts:
        it = iter(p)
        seen.append([i for _ in range(p.per_rank(p.items(0))) for i, _ in documents(next(it))])
    assert not set(seen[0]) & set(seen[1])
    rows = parts[0].items(0)
    left_out = {i for i, _ in documents({k: v[None] for k, v in rows[-1].items()})} if len(rows) % 2 else set()
    assert sorted(seen[0] + seen[1]) == sorted(set(range(1, 42)) - left_out)  # an odd row out sits the epoch out


def test_resume_replays_the_remaining_batches_exactly():
    data = samples(30, 4)
    full = loader(data, seed=5)
    it = iter(full)
    expected = [next(it) for _ in range(25)]  # crosses into the second epoch
    part = loader(data, seed=5)
    it = iter(part)
    for _ in range(9):
        next(it)
    resumed = loader(data, seed=5)
    resumed.load_state_dict(part.state_dict())
    it = iter(resumed)
    for want in expected[9:]:
        got = next(it)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_packed_row_has_the_summed_loss_and_gradients_of_its_samples_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, max_seq_len=CONTEXT)
    model = Transformer(cfg)
    reference = Transformer(cfg).double()
    reference.load_state_dict(model.state_dict())
    data = samples(12, 6)
    row = next(iter(loader(data)))
    docs = {ident for ident, _ in documents(row)}
    assert len(docs) >= 3
    targets = (row["targets"] != IGNORE).sum()
    packed = model(row["inputs"], row["targets"], positions=row["positions"], doc_ids=row["doc_ids"]) * targets
    packed.backward()
    total = torch.zeros((), dtype=torch.float64)
    for s in (data[i - 1] for i in docs):
        tokens = torch.tensor(s.tokens)
        target = torch.where(torch.tensor(s.loss_mask[1:]) == 1, tokens[1:], IGNORE)
        logits = reference(tokens[None, :-1])
        total = total + F.cross_entropy(logits[0], target, ignore_index=IGNORE, reduction="sum")
    total.backward()
    # fp32 against fp64: each summed term has a relative error of a few float32 epsilons per layer
    assert packed.item() == pytest.approx(total.item(), rel=1e-5)
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-5 * r.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["--data.max_tokens=64", "--train.batch_size=4"], "set train.batch_size=1"),
    (["--data.max_tokens=32", "--train.batch_size=1", "--train.seq_len=64"], "valid: >= 64"),
    (["--data.max_tokens=-1"], "must be >= 0"),
])
def test_impossible_budgets_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_sample_longer_than_the_budget_is_named():
    with pytest.raises(ValueError, match="a sample of 71 positions does not fit a packed row of 70"):
        pack([Sample(list(range(72)), [1] * 72)], BUDGET, PAD)


def test_pretraining_refuses_a_token_budget(prepared, tmp_path):
    cfg = load_config(None, [f"--data.path={json.dumps(str(prepared.root))}", "--data.max_tokens=64",
                             "--train.batch_size=1", f"--train.run_dir={json.dumps(str(tmp_path))}"])
    with pytest.raises(ConfigError, match="data.max_tokens batches SFT samples"):
        build_trainer(cfg)


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    letters = "abcdefghijklmnopqrstuvwxyz"
    train_char([letters + DEFAULT_CHAT_TEMPLATE + "reverse#:\n "]).save(root / "tok")
    rng = random.Random(0)
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 12))) for _ in range(60)]
    (root / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"reverse {w}", "output": w[::-1]}) + "\n"
                                            for w in words))
    return root


def sft_trainer(root, run, *extra):
    cfg = load_config(None, [
        f"--data.path={json.dumps(str(root / 'sft.jsonl'))}", f"--data.tokenizer={json.dumps(str(root / 'tok'))}",
        f"--train.run_dir={json.dumps(str(run))}", "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2",
        "--model.max_seq_len=64", "--train.seq_len=64", "--data.max_tokens=160", "--train.batch_size=1",
        "--train.steps=8", "--log.every=1", "--eval.every=0", "--checkpoint.every=0", "--log.progress=false",
        "--log.tensorboard=false", "--optim.warmup_steps=2", *extra])
    return build_trainer(cfg, task=SFTTask(cfg))[1]


def test_sft_with_a_token_budget_trains_and_resumes_exactly(sft_files, tmp_path):
    full = sft_trainer(sft_files, tmp_path / "full")
    full.fit()
    part = sft_trainer(sft_files, tmp_path / "part")
    part.fit(stop_at=3)
    resumed = sft_trainer(sft_files, tmp_path / "part", "--checkpoint.resume=auto")
    resumed.fit()
    series = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert series(tmp_path / "part") == series(tmp_path / "full") and len(series(tmp_path / "full")) == 8
