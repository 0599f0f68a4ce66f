"""Critique-and-revise: the prompts it sends, the pairs it writes (read back by `read_pairs`, as
`tessera dpo` reads them), bad input, and one run on a tiny real model."""
import json

import pytest
import torch

from tessera.alignment.critique import (CRITIQUE_TEMPLATE, REVISION_TEMPLATE, critique_and_revise, render_critiques,
                                        write_pairs)
from tessera.alignment.preference_data import read_pairs
from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE
from tessera.alignment.text_generation import text_generator
from tessera.core.config import ModelConfig
from tessera.core.generate import Sampling
from tessera.core.model import Transformer
from tessera.core.tokenizer import train_char

PRINCIPLES = ["Be polite.", "Be concise."]
PROMPTS = ["How do I boil an egg?", "Name a prime number."]


class FakeModel:
    """Deterministic: answers, critiques and revisions say what they answer, and every call is kept."""

    def __init__(self, revise=True):
        self.calls, self.revise = [], revise

    def __call__(self, prompt):
        self.calls.append(prompt)
        if prompt.endswith("Critique:"):
            principle = prompt.split("principle: ")[1].split("\n")[0]
            return f" not enough: {principle}\n"
        if prompt.endswith("Revision:"):
            return f"better answer {len(self.calls)}" if self.revise else prompt.split("Response: ")[1].split("\n")[0]
        return f"answer to {prompt}"


def test_the_loop_sends_the_rendered_templates_in_order():
    fake = FakeModel()
    (first, second) = critique_and_revise(fake, PROMPTS, PRINCIPLES)
    assert len(fake.calls) == len(PROMPTS) * (len(PRINCIPLES) + 2)
    assert fake.calls[:4] == [
        "How do I boil an egg?",
        "Prompt: How do I boil an egg?\nResponse: answer to How do I boil an egg?\n"
        "Critique the response according to this principle: Be polite.\nCritique:",
        "Prompt: How do I boil an egg?\nResponse: answer to How do I boil an egg?\n"
        "Critique the response according to this principle: Be concise.\nCritique:",
        "Prompt: How do I boil an egg?\nResponse: answer to How do I boil an egg?\nCritiques:\n"
        "- Be polite.: not enough: Be polite.\n- Be concise.: not enough: Be concise.\n"
        "Rewrite the response so that it addresses every critique.\nRevision:",
    ]
    assert first.prompt == PROMPTS[0] and first.initial == "answer to How do I boil an egg?"
    assert first.critiques == (("Be polite.", "not enough: Be polite."), ("Be concise.", "not enough: Be concise."))
    assert first.revision == "better answer 4" and second.revision == "better answer 8"
    assert first.pair() == {"prompt": PROMPTS[0], "chosen": "better answer 4",
                            "rejected": "answer to How do I boil an egg?",
                            "critiques": [{"principle": "Be polite.", "critique": "not enough: Be polite."},
                                          {"principle": "Be concise.", "critique": "not enough: Be concise."}]}
    assert render_critiques([("a", "b")]) == "- a: b"


def test_pairs_are_written_as_jsonl_that_read_pairs_reads(tmp_path):
    results = critique_and_revise(FakeModel(), PROMPTS, PRINCIPLES)
    path = tmp_path / "pairs" / "cai.jsonl"
    assert write_pairs(results, path) == (2, 0)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        (r.prompt, r.revision, r.initial) for r in results]
    tok = train_char([DEFAULT_CHAT_TEMPLATE + "".join(json.dumps(r) for r in records)])
    pairs, skipped = read_pairs(path, tok, DEFAULT_CHAT_TEMPLATE, seq_len=256)
    assert len(pairs) == 2 and skipped == 0
    for pair, r in zip(pairs, results):
        (chosen, chosen_mask), (rejected, rejected_mask) = pair.chosen, pair.rejected
        # the default chat template ends each turn with a newline
        assert tok.decode(t for t, m in zip(chosen, chosen_mask) if m) == r.revision + "\n" + tok.eos
        assert tok.decode(t for t, m in zip(rejected, rejected_mask) if m) == r.initial + "\n" + tok.eos
    assert not list(tmp_path.glob("pairs/*.tmp"))


def test_a_revision_equal_to_the_initial_response_is_left_out(tmp_path):
    results = critique_and_revise(FakeModel(revise=False), PROMPTS, PRINCIPLES)
    assert all(r.revision == r.initial for r in results)
    assert write_pairs(results, tmp_path / "none.jsonl") == (0, 2)
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_custom_templates_and_bad_input():
    calls = []
    critique_and_revise(lambda p: calls.append(p) or f"<{len(calls)}>", ["p"], ["be kind"],
                        critique_template="{response} vs {principle} for {prompt}. Critique:",
                        revision_template="{prompt}|{response}|{critiques}|Revision:")
    assert calls == ["p", "<1> vs be kind for p. Critique:", "p|<1>|- be kind: <2>|Revision:"]
    fake = FakeModel()
    with pytest.raises(ValueError, match="principles"):
        critique_and_revise(fake, PROMPTS, [])
    with pytest.raises(ValueError, match="principles"):
        critique_and_revise(fake, PROMPTS, "Be polite.")
    with pytest.raises(ValueError, match="prompts"):
        critique_and_revise(fake, ["ok", " "], PRINCIPLES)
    fields = r"critique_template must use the fields \['principle', 'prompt', 'response'\]"
    with pytest.raises(ValueError, match=fields):
        critique_and_revise(fake, PROMPTS, PRINCIPLES, critique_template="{prompt} {response}")
    with pytest.raises(ValueError, match="revision_template is not a valid format string"):
        critique_and_revise(fake, PROMPTS, PRINCIPLES, revision_template="{prompt")
    with pytest.raises(TypeError, match="must return a string"):
        critique_and_revise(lambda p: None, PROMPTS, PRINCIPLES)
    with pytest.raises(TypeError, match="function"):
        critique_and_revise("model", PROMPTS, PRINCIPLES)


def test_a_tiny_tessera_model_runs_the_loop(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = train_char([CRITIQUE_TEMPLATE, REVISION_TEMPLATE, DEFAULT_CHAT_TEMPLATE, *PROMPTS, *PRINCIPLES])
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=2, norm="rmsnorm",
                                        pos="rope", mlp="swiglu", d_ff=64, max_seq_len=512))
        # greedy, a random model answers one blank character; a fixed seed per call would sample the
        # same characters for initial and revision alike, so sampling draws from the global generator
        generate = text_generator(model, tok, max_new_tokens=6, sampling=Sampling(temperature=1.0))
        torch.manual_seed(1)
        results = critique_and_revise(generate, PROMPTS, PRINCIPLES)
        torch.manual_seed(1)
        assert critique_and_revise(generate, PROMPTS, PRINCIPLES) == results
        assert [r.prompt for r in results] == PROMPTS
        assert all(len(tok.encode(r.initial)) <= 6 and len(r.critiques) == 2 for r in results)
        assert write_pairs(results, tmp_path / "pairs.jsonl") == (2, 0)
        assert len(read_pairs(tmp_path / "pairs.jsonl", tok, DEFAULT_CHAT_TEMPLATE, seq_len=512)[0]) == 2
        with pytest.raises(ValueError, match="leaves no room"):
            generate("x" * 600)
    finally:
        torch.set_num_threads(threads)
