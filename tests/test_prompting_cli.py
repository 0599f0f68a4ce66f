"""`tessera critique | cot` in this process on tiny checkpoints, each checked against the library
functions called directly on the same in-memory model; bad input exits 2 naming what is wrong."""
import json
import string

import pytest
import torch
from safetensors.torch import save_model

from tessera.alignment.cot import Example, cot_prompt, extract_answer
from tessera.alignment.critique import critique_and_revise
from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE, render
from tessera.alignment.text_generation import text_generator
from tessera.cli.main import main
from tessera.core.config import ModelConfig, to_dict
from tessera.core.model import Transformer
from tessera.core.tokenizer import train_char

TOKENIZER = train_char([string.printable])
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
PROMPTS = ["Name a colour.", "Say hello.", "Count to three."]
PRINCIPLES = ["Be kind.", "Be brief."]
SCRIPT = "the answer is 4"
# equal lengths, so the scripted model reaches the same positions for each
QUESTIONS = [{"question": "What is 2+2?", "answer": " 4 "}, {"question": "What is 3+3?", "answer": "6"},
             {"question": "What is 5+5?"}]
EXAMPLES = [{"question": "What is 1+1?", "reasoning": "One and one make two.", "answer": "2"}]

pytestmark = pytest.mark.usefixtures("one_thread")


def save_checkpoint(directory, model, chat_template=None):
    """Laid out as training writes it: weights, model config, tokenizer (and its chat template)."""
    directory.mkdir(parents=True)
    save_model(model, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(to_dict(model.cfg)))
    TOKENIZER.save(directory)
    if chat_template is not None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return directory


def scripted_model(first_position: int, text: str) -> Transformer:
    """Says `text` then eos when generation starts at `first_position`, whatever the prompt: the blocks
    are zero, so the logits come from the position alone (one direction of the residual per step)."""
    cfg = ModelConfig(vocab_size=TOKENIZER.vocab_size, n_layers=1, d_model=32, n_heads=2, max_seq_len=256,
                      tie_embeddings=False)
    model = Transformer(cfg).eval()
    targets = [*TOKENIZER.encode(text), TOKENIZER.eos_id]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        for step, token in enumerate(targets):
            model.pos_emb.weight[first_position - 1 + step, step] = 10.0
            model.lm_head.weight[token, step] += 1.0
    return model


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_critique_writes_the_pairs_of_the_library_loop(tmp_path, capsys):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=TOKENIZER.vocab_size, n_layers=1, d_model=32, n_heads=2,
                                    max_seq_len=256, init_std=0.5)).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, CHAT_TEMPLATE)
    (tmp_path / "principles.txt").write_text("\n".join(PRINCIPLES[:1] + ["", "  "] + PRINCIPLES[1:]) + "\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out" / "pairs.jsonl"
    status = main(["critique", "--ckpt", str(ckpt), "--prompts", str(tmp_path / "prompts.jsonl"), "--principles",
                   str(tmp_path / "principles.txt"), "--out", str(out), "--max-new-tokens", "6", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 0, captured.err

    reference = critique_and_revise(text_generator(model, TOKENIZER, 6, chat_template=CHAT_TEMPLATE), PROMPTS,
                                    PRINCIPLES)
    expected = [r.pair() for r in reference if r.revision != r.initial]
    assert expected, "the tiny model should revise at least one answer"
    pairs = read_jsonl(out)
    assert pairs == expected
    assert all(p["chosen"] != p["rejected"] and [c["principle"] for c in p["critiques"]] == PRINCIPLES for p in pairs)
    assert captured.out.strip() == (f"{len(expected)} pairs written to {out}, "
                                    f"{len(PROMPTS) - len(expected)} left out (revision unchanged)")
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize("examples, template", [(None, None), (EXAMPLES, DEFAULT_CHAT_TEMPLATE)])
def test_cot_answers_and_accuracy(tmp_path, capsys, examples, template):
    """Zero-shot as plain text, and few-shot through the default chat template (the checkpoint has none)."""
    worked = [Example(**e) for e in examples or []]
    prompts = [cot_prompt(q["question"], worked) for q in QUESTIONS]
    rendered = [p if template is None else
                render(template, [{"role": "user", "content": p}], True) for p in prompts]
    lengths = {len(TOKENIZER.encode(r)) for r in rendered}
    assert len(lengths) == 1
    model = scripted_model(lengths.pop(), SCRIPT)
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    args = ["cot", "--ckpt", str(ckpt), "--questions", str(write_jsonl(tmp_path / "q.jsonl", QUESTIONS)),
            "--out", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "20", "--device", "cpu"]
    if examples:
        args += ["--examples", str(write_jsonl(tmp_path / "examples.jsonl", examples))]
    if template is None:
        args.append("--no-chat-template")
    status = main(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err

    generate = text_generator(model, TOKENIZER, 20, chat_template=template)
    rows = read_jsonl(tmp_path / "answers.jsonl")
    assert [(r["question"], r["prompt"]) for r in rows] == [(q["question"], p) for q, p in zip(QUESTIONS, prompts)]
    for row, question in zip(rows, QUESTIONS):
        assert row["response"] == generate(row["prompt"]) == SCRIPT
        assert row["answer"] == extract_answer(row["response"]) == "4"
        assert ("expected" in row, "correct" in row) == ("answer" in question,) * 2
    assert [r.get("correct") for r in rows] == [True, False, None]
    assert captured.out.strip() == f"3 answers written to {tmp_path / 'answers.jsonl'}; accuracy 1/2 = 0.500"


@pytest.fixture
def inputs(tmp_path):
    save_checkpoint(tmp_path / "ckpt", scripted_model(100, SCRIPT))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi."}])
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi."}, {"text": "no prompt"}])
    (tmp_path / "principles.txt").write_text("Be kind.\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "template.txt").write_text("{prompt} {response}")
    write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": 4}])
    return tmp_path


@pytest.mark.parametrize("change, message", [
    ({"--prompts": "bad.jsonl"}, "bad.jsonl:2: a line must hold a JSON object with a non-empty string 'prompt'"),
    ({"--principles": "empty.txt"}, "empty.txt: no principles"),
    ({"--ckpt": "nowhere"}, "nowhere is not a checkpoint"),
    ({"--critique-template": "template.txt"}, "must use the fields ['principle', 'prompt', 'response']"),
    ({"cot": "q.jsonl"}, "q.jsonl:1: 'answer' must be a string, got int"),
])
def test_bad_input_exits_2(inputs, capsys, change, message):
    if "cot" in change:
        command, options = "cot", {"--ckpt": "ckpt", "--questions": change["cot"]}
    else:
        command, options = "critique", {"--ckpt": "ckpt", "--prompts": "prompts.jsonl",
                                        "--principles": "principles.txt", **change}
    args = [command, *(x for k, v in options.items() for x in (k, str(inputs / v)))]
    assert main([*args, "--out", str(inputs / "out.jsonl"), "--device", "cpu", "--max-new-tokens", "4"]) == 2
    assert message in capsys.readouterr().err
    assert not (inputs / "out.jsonl").exists()
