"""The domain fine-tuning, multilingual and assistant recipes: their measures against hand-computed
values and independent readers, and each recipe end to end at smoke size."""
from __future__ import annotations

import gettext
import json
import io
import math
import random
import struct

import pytest

from tessera.recipes import assistant_tasks as tasks
from tessera.recipes.domain_corpus import docstring_paragraphs, held_out
from tessera.recipes.multilingual_data import (LANGUAGES, django_messages, fertility, in_script, read_mo,
                                               script_share, temperature_mix, temperature_weights)


def _mo(pairs: dict[str, str], order: str = "<") -> bytes:
    """A .mo file written from the GNU format's description (header entry first, sorted ids)."""
    items = sorted({"": "Content-Type: text/plain; charset=UTF-8\n", **pairs}.items())
    ids = [k.encode() for k, _ in items]
    strs = [v.encode() for _, v in items]
    start = 28 + 16 * len(items)
    table_o, table_t, blob = [], [], b""
    for s in ids:
        table_o.append((len(s), start + len(blob)))
        blob += s + b"\0"
    for s in strs:
        table_t.append((len(s), start + len(blob)))
        blob += s + b"\0"
    head = struct.pack(order + "7I", 0x950412DE, 0, len(items), 28, 28 + 8 * len(items), 0, 0)
    tables = b"".join(struct.pack(order + "2I", *e) for e in table_o + table_t)
    return head + tables + blob


@pytest.mark.parametrize("order", ["<", ">"])
def test_read_mo_agrees_with_gettext(tmp_path, order):
    pairs = {"Save": "Сохранить", "Delete %(name)s": "Διαγραφή %(name)s", "Home": "主页", "One\x00Many": "واحد\x00كثير"}
    path = tmp_path / "x.mo"
    path.write_bytes(_mo(pairs, order))
    assert read_mo(path) == pairs
    reference = gettext.GNUTranslations(io.BytesIO(path.read_bytes()))
    assert all(reference.gettext(k) == v for k, v in pairs.items() if "\x00" not in k)
    assert reference.ngettext("One", "Many", 5) == "كثير"


def test_read_mo_reads_djangos_catalogs_as_gettext_does():
    django = pytest.importorskip("django")
    from pathlib import Path

    mo = Path(django.__file__).parent / "conf/locale/ru/LC_MESSAGES/django.mo"
    pairs = read_mo(mo)
    reference = gettext.GNUTranslations(mo.open("rb"))
    plain = {k: v for k, v in pairs.items() if "\x00" not in k and "\x04" not in k}
    assert len(plain) > 100 and all(reference.gettext(k) == v for k, v in plain.items())
    for language, (_, script) in LANGUAGES.items():  # the catalogs are in the script each language is said to use
        messages = django_messages(language)
        assert len(messages) > 300 and sum(in_script(m, script) for m in messages) > 0.9 * len(messages)
        assert not any("%(" in m for m in messages)


def test_temperature_weights_by_hand():
    assert temperature_weights({"a": 400, "b": 100}, 1.0) == pytest.approx({"a": 0.8, "b": 0.2})
    assert temperature_weights({"a": 400, "b": 100}, 2.0) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert temperature_weights({"a": 400, "b": 100}, 0.5) == pytest.approx({"a": 16 / 17, "b": 1 / 17})
    flat = temperature_weights({"a": 10 ** 6, "b": 1, "c": 50}, 1e9)
    assert all(v == pytest.approx(1 / 3, rel=1e-6) for v in flat.values())
    with pytest.raises(ValueError, match="temperature"):
        temperature_weights({"a": 1}, 0)


def test_temperature_mix_fills_each_share():
    rng = random.Random(3)
    texts = {"big": ["x" * rng.randint(5, 40) for _ in range(300)], "small": ["y" * rng.randint(5, 40) for _ in range(12)]}
    total = 6000
    mixed = temperature_mix(texts, 3.0, total, seed=0)
    weights = temperature_weights({k: sum(map(len, v)) for k, v in texts.items()}, 3.0)
    for language, letter in (("big", "x"), ("small", "y")):
        chars = sum(len(m) for m in mixed if m[0] == letter)
        assert weights[language] * total <= chars < weights[language] * total + 40
    small_chars = sum(map(len, texts["small"]))
    assert sum(len(m) for m in mixed if m[0] == "y") > small_chars  # the small language is repeated
    assert mixed == temperature_mix(texts, 3.0, total, seed=0) and mixed != temperature_mix(texts, 3.0, total, seed=1)


def test_fertility_by_hand(char_tokenizer):
    assert fertility(str.split, ["ab cd", "efg"]) == {"tokens_per_word": 1.0, "tokens_per_char": 3 / 7}
    text = "To be, or not to be"
    got = fertility(char_tokenizer.encode, [text])  # one token per character, spaces included
    assert got == {"tokens_per_word": len(text) / 6, "tokens_per_char": len(text) / len(text.replace(" ", ""))}


def test_script_share_by_hand():
    assert script_share("Привет world", "Cyrillic") == pytest.approx(6 / 11)
    assert script_share("中文abc!", "Han") == pytest.approx(2 / 5)
    assert script_share("نمستے", "Arabic") == 1.0 and script_share("नमस्ते", "Devanagari") == 1.0  # signs are not letters
    assert script_share("Καλημέρα", "Greek") == 1.0 and script_share("123 ...", "Latin") == 0.0
    assert in_script("Сохранить file", "Cyrillic") and not in_script("Save файл", "Cyrillic")


def test_judge_solves_every_kind_by_hand():
    cases = {"Reverse the word: qorin": "niroq", "Sort the words: pear fig apple": "apple fig pear",
             "Count the letter a in: banaxa": "3", "Count the letter z in: river": "0", "Add: 17 + 25": "42"}
    for prompt, answer in cases.items():
        assert tasks.solve(prompt) == answer
        assert tasks.judge(prompt, f" {answer}\n") == 1 and tasks.judge(prompt, answer + "x") == 0
    with pytest.raises(ValueError, match="not a task prompt"):
        tasks.solve("Write a poem")


def test_tasks_wrong_answers_and_win_rate():
    rng = random.Random(0)
    held = tasks.task_set(40, seed=1)
    train = tasks.task_set(200, seed=2, exclude=frozenset(p for p, _ in held))
    assert len({p for p, _ in train}) == 200 and not {p for p, _ in train} & {p for p, _ in held}
    for prompt, answer in held + train:
        assert tasks.judge(prompt, answer) == 1 and tasks.judge(prompt, tasks.wrong_answer(prompt, rng)) == 0
    prompts = ["Add: 1 + 1", "Add: 2 + 2", "Add: 3 + 3", "Add: 4 + 4"]
    got = tasks.win_rate(prompts, ["2", "4", "0", "0"], ["2", "0", "6", "0"])
    assert got == {"wins": 1, "ties": 2, "losses": 1, "win_rate": 0.5}


def test_docstring_prose_leaves_out_examples_and_splits_by_file():
    source = '''"""Module about groups.

A group is a set with an associative operation, an identity and inverses for every element.

Examples
========

>>> from sympy import S
>>> S(1) + 1
2
"""
def f():
    """Short.

    The function returns the order of the cyclic subgroup generated by the given element here.

    .. math:: x^2
    """
'''
    assert docstring_paragraphs(source) == [
        "A group is a set with an associative operation, an identity and inverses for every element.",
        "The function returns the order of the cyclic subgroup generated by the given element here."]
    assert docstring_paragraphs("def broken(:") == []
    share = sum(held_out(f"pkg/mod{i}.py", 10) for i in range(2000)) / 2000
    assert 0.07 < share < 0.13 and held_out("a/b.py", 10) == held_out("a/b.py", 10)
    assert math.isfinite(share)


def _check(out, summary, stages):
    from test_recipes import check_summary

    if stages is None:
        check_summary(out, summary)
        return
    for part in ("metrics_before", "metrics_after", "wall_s"):
        assert summary[part] and all(isinstance(v, (int, float)) and math.isfinite(v)
                                     for v in summary[part].values()), summary[part]
    assert set(summary["wall_s"]) == stages and (out / "summary.md").exists() and (out / "loss.png").exists()


def test_domain_smoke(tmp_path, one_thread):
    from tessera.recipes.runner import run_recipe

    summary = run_recipe("domain", tmp_path, smoke=True)
    _check(tmp_path, summary, {"prepare", "pretrain (general text)", "fine-tune (every weight)",
                               "fine-tune (LoRA)", "evaluate", "sample"})
    before, after = summary["metrics_before"], summary["metrics_after"]
    assert set(after) == {"domain_ppl", "general_ppl", "domain_ppl (LoRA)", "general_ppl (LoRA)"}
    assert after["domain_ppl"] < before["domain_ppl"]  # a few steps on the domain already lower its perplexity
    assert (tmp_path / "lora" / "adapter" / "adapter.safetensors").exists()


def test_multilingual_smoke(tmp_path, one_thread):
    pytest.importorskip("django")  # the recipes extra: its translation catalogs are the data
    from tessera.recipes.runner import run_recipe

    summary = run_recipe("multilingual", tmp_path, smoke=True)
    _check(tmp_path, summary, None)
    after = summary["metrics_after"]
    for language in LANGUAGES:
        assert 0 <= after[f"{language} in-script share"] <= 1 and after[f"{language} tokens/char (T=1)"] > 0
        assert after[f"{language} val_ppl"] < summary["metrics_before"][f"{language} val_ppl"]
    assert len(summary["samples"]) == len(LANGUAGES)


def test_assistant_smoke_and_served(tmp_path, one_thread):
    """The recipe's DPO checkpoint answers a chat request through `tessera serve` exactly as the
    recipe's evaluation decodes it (the server's transcript is the template it was tuned on)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from serve_server import AUTH, start

    from tessera.core.checkpoint import find_checkpoint
    from tessera.recipes.assistant import answers
    from tessera.recipes.runner import load_trained, run_recipe

    summary = run_recipe("assistant", tmp_path, smoke=True)
    _check(tmp_path, summary, {"prepare", "pretrain (general text)", "SFT", "preference pairs", "DPO", "evaluate"})
    after = summary["metrics_after"]
    assert after["DPO vs SFT wins"] + after["DPO vs SFT ties"] + after["DPO vs SFT losses"] == 8
    assert 0 <= after["DPO vs SFT win_rate"] <= 1 and 0 <= after["accuracy"] <= 1
    pairs = (tmp_path / "data" / "dpo.jsonl").read_text().splitlines()
    assert len(pairs) == 8 and all(tasks.judge(r["prompt"], r["chosen"]) and not tasks.judge(r["prompt"], r["rejected"])
                                   for r in map(json.loads, pairs))

    ckpt = find_checkpoint(tmp_path)
    prompt = "Add: 12 + 30"
    from tessera.core.tokenizer import load_tokenizer

    expected = answers(load_trained(ckpt), load_tokenizer(ckpt), [prompt], max_new_tokens=20)[0]
    proc, base = start(ckpt)
    try:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 20, "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == expected


def test_scenes_vlm_smoke(tmp_path, one_thread):
    """Every stage of the scenes VLM recipe runs at tiny size and reports held-out metrics in range;
    the run directory is a VLM checkpoint the multimodal commands load, and the chat through the
    server answers as the model does on the prompt it was instructed with (the served transcript)."""
    pytest.importorskip("fastapi")
    from tessera.multimodal.vlm_inference import answers, image_pixels, is_vlm_checkpoint, load_vlm
    from tessera.recipes.runner import run_recipe
    from tessera.recipes.scenes_vlm import chat

    summary = run_recipe("scenes_vlm", tmp_path, smoke=True)
    _check(tmp_path, summary, {"prepare", "LM", "CLIP", "VLM as initialised", "align", "instruct", "evaluate",
                               "chat through tessera serve"})
    after = summary["metrics_after"]
    assert set(summary["metrics_before"]) <= set(after)
    assert all(0 <= v <= 1 for k, v in after.items() if "exact match" in k or "VQA" in k or "CLIP" in k or "chat" in k)
    assert after["CLIP i2t_r1"] <= after["CLIP i2t_r5"] <= after["CLIP i2t_r10"]
    assert 0 <= after["caption METEOR"] <= 1
    assert is_vlm_checkpoint(summary["checkpoint"])
    held_out = tmp_path / "data" / "held_out"
    served = chat(summary["checkpoint"], held_out, 2)
    model, cfg = load_vlm(summary["checkpoint"], "cpu")
    rows = [json.loads(line) for line in (held_out / "vqa.jsonl").read_text().splitlines()][:2]
    pixels = [image_pixels((held_out / "images" / r["image"]).read_bytes(), r["image"], cfg)[None] for r in rows]
    from tessera.core.tokenizer import load_tokenizer

    direct = answers(model, load_tokenizer(summary["checkpoint"]), [cfg.vlm.prompt.format(text=r["question"]) for r in rows],
                     pixels, 8)
    assert [p for _, p, _ in served] == direct and [q for q, _, _ in served] == [r["question"] for r in rows]


def test_digits_smoke(tmp_path, one_thread):
    """CLIP on the scans: held-out rows carry their labels, so the summary has zero-shot accuracy
    before (step 0) and after, within [0, 1]; no held-out scan is trained on."""
    from tessera.recipes.runner import run_recipe

    summary = run_recipe("digits", tmp_path, smoke=True)
    _check(tmp_path, summary, {"prepare", "train"})
    for part in ("metrics_before", "metrics_after"):
        assert 0 <= summary[part]["val_zero_shot_acc"] <= 1 and summary[part]["val_loss"] > 0
    data = tmp_path / "data"
    held_out = {json.loads(r)["image"] for r in (data / "held_out" / "captions.jsonl").read_text().splitlines()}
    trained = {json.loads(r)["image"] for r in (data / "train" / "captions.jsonl").read_text().splitlines()}
    assert len(held_out) == 40 and not held_out & trained
