import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera.core.config import ModelConfig
from tessera.core.data import ShardReader
from tessera.core.evaluate import perplexity, text_metrics
from tessera.core.model import Transformer


def test_perplexity_equals_an_independent_float64_computation(prepared):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=prepared.vocab_size, n_layers=1, n_heads=2, d_model=16,
                                    max_seq_len=64)).double()
    got = perplexity(model, prepared, "val", seq_len=50, batch_size=7, device=torch.device("cpu"))
    tokens = np.concatenate(list(ShardReader(prepared).tokens(prepared.shards("val")))).astype(np.int64)
    n = len(tokens) // 51
    windows = torch.from_numpy(tokens[: n * 51].reshape(n, 51))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1), reduction="sum")
    expected = nll.item() / (n * 50)
    assert got["tokens"] == n * 50
    assert got["nll"] == pytest.approx(expected, rel=1e-9)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-9)


def test_text_metrics_against_hand_computed_values():
    perfect = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge1"] == pytest.approx(1.0)
    # 3 of 4 unigrams shared: precision 3/4, recall 3/5 -> F1 = 2/3; bigrams: 1 of 3 and 1 of 4 -> 2/7
    scores = text_metrics(["a cat sat here"], ["a dog sat here now"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(2 / 7)
    assert 0 < scores["bleu"] < 100


def test_text_metrics_need_paired_lines():
    with pytest.raises(ValueError, match="must pair up"):
        text_metrics(["a", "b"], ["a"])


def test_perplexity_max_batches_takes_the_first_batches_with_a_progress_bar(prepared, capsys):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=prepared.vocab_size, n_layers=1, n_heads=2, d_model=16,
                                    max_seq_len=64)).double()
    cpu = torch.device("cpu")
    first = perplexity(model, prepared, "val", seq_len=50, batch_size=7, device=cpu, max_batches=2, progress=True)
    assert "perplexity (val)" in capsys.readouterr().err and first["tokens"] == 2 * 7 * 50
    tokens = np.concatenate(list(ShardReader(prepared).tokens(prepared.shards("val")))).astype(np.int64)
    windows = torch.from_numpy(tokens[: 14 * 51].reshape(14, 51))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)).item()
    assert first["nll"] == pytest.approx(nll, rel=1e-9)
    assert perplexity(model, prepared, "val", seq_len=50, batch_size=7, device=cpu, max_batches=2) == first  # no bar
    whole = perplexity(model, prepared, "val", seq_len=50, batch_size=7, device=cpu, max_batches=10_000)
    assert whole == perplexity(model, prepared, "val", seq_len=50, batch_size=7, device=cpu)
    with pytest.raises(ValueError, match="max_batches"):
        perplexity(model, prepared, "val", seq_len=50, batch_size=7, device=cpu, max_batches=-1)
