"""Instruction data: prompt tokens never reach the loss, packing equals one sample per row, and
bad lines name their file and line."""
import json

import pytest
import torch

from tessera import kernels
from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE, IGNORE, _row, encode, pack, read_sft
from tessera.core.config import ModelConfig
from tessera.core.data import DataError
from tessera.core.model import Transformer
from tessera.core.tokenizer import train_char

RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
                  {"role": "assistant", "content": "hi there"}]},
    {"instruction": "Repeat: abc", "output": "abc abc"},
]


@pytest.fixture(scope="module")
def tok():
    text = "".join(json.dumps(r) for r in RECORDS) + DEFAULT_CHAT_TEMPLATE + "#:\n 0123456789abcdefghijklmnopqrstuvwxyz"
    return train_char([text])


def model(vocab):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                                   norm="rmsnorm", pos="rope", mlp="swiglu", d_ff=48, max_seq_len=256))


def test_only_the_response_and_eos_are_targets(tok):
    s = encode(tok, DEFAULT_CHAT_TEMPLATE, RECORDS[0], seq_len=100)
    response = [t for t, m in zip(s.tokens, s.loss_mask) if m]
    assert tok.decode(response[:-1]) == "5\n" and response[-1] == tok.eos_id
    assert tok.decode(s.tokens[: s.loss_mask.index(1)]).endswith("### assistant:\n")


def test_prompt_positions_get_exactly_zero_gradient(tok):
    m = model(tok.vocab_size)
    row = _row([encode(tok, DEFAULT_CHAT_TEMPLATE, RECORDS[1], seq_len=100)], 100, tok.pad_id)
    h = m.hidden_states(row["inputs"][None], row["positions"][None], row["doc_ids"][None])
    h.retain_grad()
    kernels.linear_cross_entropy(h, m.lm_head.weight, row["targets"][None]).backward()
    ignored = row["targets"] == IGNORE
    assert ignored.sum() > 20 and (~ignored).sum() >= 2
    assert torch.all(h.grad[0, ignored] == 0)
    assert torch.all(h.grad[0, ~ignored].abs().sum(-1) > 0)


def test_packed_rows_give_the_loss_and_gradients_of_one_sample_per_row(tok):
    samples = [encode(tok, DEFAULT_CHAT_TEMPLATE, r, seq_len=200) for r in RECORDS]
    packed = pack(samples, 200, tok.pad_id)
    assert len(packed) == 1  # all three fit one row
    separate = [_row([s], 200, tok.pad_id) for s in samples]

    def loss_and_grads(rows):
        m = model(tok.vocab_size)
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        loss = m(batch["inputs"], batch["targets"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        loss.backward()
        return loss.item(), {n: p.grad for n, p in m.named_parameters()}

    packed_loss, packed_grads = loss_and_grads(packed)
    separate_loss, separate_grads = loss_and_grads(separate)
    assert packed_loss == pytest.approx(separate_loss, rel=1e-6)
    for name, g in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("line, message", [
    ("{not json", "Expecting property name"),
    ('{"instruction": "x"}', "missing field(s) ['output']"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
    ('{"instruction": "a", "output": "' + "b" * 200 + '"}', "longer than train.seq_len=64"),
    ('{"instruction": "' + "a" * 200 + '", "output": "b"}', "leaves no room for a response"),
    ("[1, 2]", "one JSON object"),
])
def test_bad_lines_name_file_and_line(tok, tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=rf"data.jsonl:3: .*{__import__('re').escape(message)}"):
        read_sft(path, tok, DEFAULT_CHAT_TEMPLATE, seq_len=64)
    samples, skipped = read_sft(path, tok, DEFAULT_CHAT_TEMPLATE, seq_len=64, on_error="skip")
    assert (len(samples), skipped) == (1, 1)
