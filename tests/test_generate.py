import pytest
import torch

from tessera.core.config import ModelConfig
from tessera.core.generate import Sampling, generate, generate_tokens, sample_next
from tessera.core.model import Transformer

STYLES = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu"),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=1),
    "mistral": dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=1, sliding_window=6, qkv_bias=True,
                    attn_head_dim=12),
}


def model(style, max_seq_len=48):
    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=31, n_layers=2, n_heads=2, d_model=16, max_seq_len=max_seq_len, **STYLES[style])
    m = Transformer(cfg).double()
    with torch.no_grad():  # sharpen the random model so greedy choices are far from ties
        m.lm_head.weight.mul_(20)
    return m


GREEDY = Sampling(temperature=0)


@pytest.mark.parametrize("style", STYLES)
def test_greedy_with_cache_equals_without_token_for_token(style):
    m = model(style)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    cached = generate_tokens(m, prompts, 30, sampling=GREEDY, use_cache=True)
    uncached = generate_tokens(m, prompts, 30, sampling=GREEDY, use_cache=False)
    assert cached == uncached
    assert all(len(c) == 30 for c in cached)


@pytest.mark.parametrize("style", STYLES)
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(style):
    m = model(style)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7], [1, 8, 2, 8]]
    batched = generate_tokens(m, prompts, 12, sampling=GREEDY)
    alone = [generate_tokens(m, [p], 12, sampling=GREEDY)[0] for p in prompts]
    assert batched == alone


def test_generation_runs_past_the_context_window():
    m = model("gpt2", max_seq_len=16)
    out = generate_tokens(m, [[1, 2, 3]], 40, sampling=GREEDY)
    assert len(out[0]) == 40
    # until the window fills, cached and uncached agree exactly
    assert out[0][:13] == generate_tokens(m, [[1, 2, 3]], 13, sampling=GREEDY, use_cache=False)[0]


def test_stop_tokens_end_each_sequence():
    m = model("llama")
    free = generate_tokens(m, [[1, 2], [3]], 20, sampling=GREEDY)
    stop = free[0][4]
    steps = list(generate(m, [[1, 2], [3]], 20, sampling=GREEDY, stop_ids=[stop]))
    first = [s[0] for s in steps]
    end = first.index(stop)
    assert all(t is None for t in first[end + 1:])
    assert first[: end + 1] == free[0][: end + 1]


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, Sampling(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    p = torch.softmax(logits[0], 0)
    nucleus = sample_next(logits, Sampling(temperature=1.0, top_p=float(p[0] + p[1] / 2)), g)
    assert set(nucleus.tolist()) == {0, 1}
    full = sample_next(logits, Sampling(temperature=1.0), g)
    freq = torch.bincount(full, minlength=5).double() / len(full)
    torch.testing.assert_close(freq, p.double(), atol=0.03, rtol=0)
    assert sample_next(logits[:1], GREEDY).item() == 0


def test_sampling_is_reproducible_with_a_seed():
    m = model("gpt2")
    a = generate_tokens(m, [[1, 2]], 15, sampling=Sampling(0.9, top_k=10), seed=3)
    b = generate_tokens(m, [[1, 2]], 15, sampling=Sampling(0.9, top_k=10), seed=3)
    assert a == b


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="at least one token"):
        list(generate(model("gpt2"), [[]], 3))


def test_a_text_stream_prints_multi_byte_characters_whole_and_nothing_twice():
    """Token by token, a byte-level tokenizer splits 'é' and '☃' over several tokens: decoding each
    token alone prints replacement characters (what `tessera generate` used to do)."""
    from tessera.core.text_stream import TextStream
    from tessera.core.tokenizer import train_bpe

    text = "naïve café ☃ über straße 日本語"
    tok = train_bpe(iter(["plain ascii words only " * 50]), vocab_size=300)
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # the old way breaks characters
    stream = TextStream(tok, [])
    deltas = [stream.push(i)[0] for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish() == text
