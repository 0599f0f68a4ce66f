"""`tessera critique | cot`: the prompting utilities of `tessera.alignment` run on a checkpoint.

Every input is read and checked before the model loads, so a bad line or template fails in a
second, not after minutes of loading. Bad input raises DataError or ValueError, which `tessera`
reports in one line with exit status 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tessera.cli.evaluate import DEVICES


def _text_generator(args):
    """The checkpoint as a prompt -> response function, with its own chat template unless told not to."""
    from tessera.alignment.sft_data import chat_template
    from tessera.alignment.text_generation import text_generator
    from tessera.core.placement import resolve_device
    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.generate import Sampling
    from tessera.core.tokenizer import load_tokenizer
    from tessera.interop.quantize import load_for_inference

    ckpt = find_checkpoint(args.ckpt)
    model = load_for_inference(ckpt, resolve_device(args.device))
    return text_generator(model, load_tokenizer(ckpt), args.max_new_tokens, Sampling(temperature=args.temperature),
                          None if args.no_chat_template else chat_template(ckpt), args.seed)


def _progress(items, command: str, unit: str):
    from tqdm import tqdm

    return tqdm(items, desc=command, unit=unit, mininterval=1.0, dynamic_ncols=True)


def _template(path: str | None, default: str, fields: set[str], option: str) -> str:
    from tessera.alignment.critique import check_template

    if path is None:
        return default
    template = Path(path).read_text(encoding="utf-8")
    check_template(template, fields, f"{option} {path}")
    return template


def _prompt(record: dict) -> str:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("a line must hold a JSON object with a non-empty string 'prompt'")
    return prompt


def cmd_critique(args) -> None:
    from tessera.alignment import critique
    from tessera.core.data import DataError
    from tessera.core.data.jsonl import read_records

    prompts, _ = read_records(args.prompts, _prompt, what="prompts")
    principles = [line.strip() for line in Path(args.principles).read_text(encoding="utf-8").splitlines()
                  if line.strip()]
    if not principles:
        raise DataError(f"{args.principles}: no principles (one per non-empty line)")
    critique_template = _template(args.critique_template, critique.CRITIQUE_TEMPLATE, critique.CRITIQUE_FIELDS,
                                  "--critique-template")
    revision_template = _template(args.revision_template, critique.REVISION_TEMPLATE, critique.REVISION_FIELDS,
                                  "--revision-template")
    generate = _text_generator(args)
    results = []
    for prompt in _progress(prompts, "critique", "prompt"):
        results += critique.critique_and_revise(generate, [prompt], principles, critique_template, revision_template)
    written, left_out = critique.write_pairs(results, args.out)
    print(f"{written} pairs written to {args.out}, {left_out} left out (revision unchanged)")


def _question(record: dict) -> dict:
    question, expected = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("a line must hold a JSON object with a non-empty string 'question'")
    if expected is not None and not isinstance(expected, str):
        raise ValueError(f"'answer' must be a string, got {type(expected).__name__}")
    return {"question": question, "expected": expected}


def _example(record: dict):
    from tessera.alignment.cot import Example

    return Example(record.get("question"), record.get("reasoning"), record.get("answer"))


def is_correct(answer: str | None, expected: str) -> bool:
    """Exact match up to surrounding space and case: a short answer is the same answer written either way."""
    return answer is not None and answer.strip().casefold() == expected.strip().casefold()


def cmd_cot(args) -> None:
    from tessera.alignment.cot import cot_prompt, extract_answer
    from tessera.core.data.jsonl import read_records

    questions, _ = read_records(args.questions, _question, what="questions")
    examples = read_records(args.examples, _example, what="examples")[0] if args.examples else []
    generate = _text_generator(args)
    rows = []
    for q in _progress(questions, "cot", "question"):
        prompt = cot_prompt(q["question"], examples)
        response = generate(prompt)
        row = {"question": q["question"], "prompt": prompt, "response": response, "answer": extract_answer(response)}
        if q["expected"] is not None:
            row.update(expected=q["expected"], correct=is_correct(row["answer"], q["expected"]))
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, out)
    graded = [row["correct"] for row in rows if "correct" in row]
    accuracy = f"; accuracy {sum(graded)}/{len(graded)} = {sum(graded) / len(graded):.3f}" if graded else ""
    print(f"{len(rows)} answers written to {args.out}{accuracy}")


def _add_generation_options(p) -> None:
    p.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, help="seeds each call's sampling, so a prompt always gets the same response")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as plain text (a base model) instead of as a chat user turn")
    p.add_argument("--device", default="auto", choices=DEVICES)


def add_parsers(sub) -> None:
    cr = sub.add_parser("critique", help="critique-and-revise a checkpoint's answers into preference pairs")
    _add_generation_options(cr)
    cr.add_argument("--prompts", required=True, help='JSONL of {"prompt": ...} lines')
    cr.add_argument("--principles", required=True, help="text file, one principle per non-empty line")
    cr.add_argument("--out", required=True, help="JSONL of preference pairs (prompt, chosen, rejected, critiques)")
    cr.add_argument("--critique-template", help="file with a template of {prompt}, {response}, {principle}")
    cr.add_argument("--revision-template", help="file with a template of {prompt}, {response}, {critiques}")
    cr.set_defaults(func=cmd_critique)

    co = sub.add_parser("cot", help="chain-of-thought answers of a checkpoint, with accuracy when answers are known")
    _add_generation_options(co)
    co.add_argument("--questions", required=True, help='JSONL of {"question": ..., "answer": ... (optional)} lines')
    co.add_argument("--examples", help='JSONL of worked {"question", "reasoning", "answer"} (few-shot; default zero-shot)')
    co.add_argument("--out", required=True, help="JSONL, one line per question")
    co.set_defaults(func=cmd_cot)
