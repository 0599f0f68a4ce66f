"""Critique and revise ("constitutional" self-critique, Bai et al. 2022): a model answers a
prompt, critiques its answer against each principle of a list, and rewrites it in the light of
the critiques. The revision is preferred to the initial answer, so each prompt yields a
preference pair for `tessera dpo` or `tessera rm` with no human labels.

All critiques are gathered before one revision (rather than a revision per principle) so that a
revision cannot undo what an earlier principle asked for, and the cost per prompt is one call per
principle plus two. `generate` is any function prompt text -> response text
(`text_generation.text_generator` makes one of a Tessera model).
"""
from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tessera.alignment.text_generation import TextGenerator

CRITIQUE_TEMPLATE = (
    "Prompt: {prompt}\n"
    "Response: {response}\n"
    "Critique the response according to this principle: {principle}\n"
    "Critique:"
)
REVISION_TEMPLATE = (
    "Prompt: {prompt}\n"
    "Response: {response}\n"
    "Critiques:\n"
    "{critiques}\n"
    "Rewrite the response so that it addresses every critique.\n"
    "Revision:"
)
CRITIQUE_FIELDS = {"prompt", "response", "principle"}
REVISION_FIELDS = {"prompt", "response", "critiques"}


@dataclass(frozen=True)
class Revised:
    """One prompt through the loop."""
    prompt: str
    initial: str
    critiques: tuple[tuple[str, str], ...]  # (principle, critique) in the order of the principles
    revision: str

    def pair(self) -> dict:
        """The preference record `read_pairs` reads, the critiques kept alongside for inspection."""
        return {"prompt": self.prompt, "chosen": self.revision, "rejected": self.initial,
                "critiques": [{"principle": p, "critique": c} for p, c in self.critiques]}


def check_template(template: str, fields: set[str], name: str) -> None:
    """ValueError unless `template` is a str.format template naming exactly `fields`."""
    try:
        found = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{name} is not a valid format string: {e}") from None
    if found != fields:
        raise ValueError(f"{name} must use the fields {sorted(fields)} (as {{name}}), found {sorted(found)}")


def render_critiques(critiques: Sequence[tuple[str, str]]) -> str:
    """One line per principle: `- principle: critique`."""
    return "\n".join(f"- {principle}: {critique}" for principle, critique in critiques)


def _call(generate: TextGenerator, prompt: str) -> str:
    out = generate(prompt)
    if not isinstance(out, str):
        raise TypeError(f"generate must return a string, returned {type(out).__name__}")
    return out.strip()


def critique_and_revise(generate: TextGenerator, prompts: Sequence[str], principles: Sequence[str],
                        critique_template: str = CRITIQUE_TEMPLATE,
                        revision_template: str = REVISION_TEMPLATE) -> list[Revised]:
    """Initial response, one critique per principle, and a revision, for every prompt (in order)."""
    if not callable(generate):
        raise TypeError("generate must be a function prompt text -> response text")
    if isinstance(principles, str) or not principles or not all(isinstance(p, str) and p.strip() for p in principles):
        raise ValueError("principles must be a non-empty list of non-empty strings")
    if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a list of non-empty strings")
    check_template(critique_template, CRITIQUE_FIELDS, "critique_template")
    check_template(revision_template, REVISION_FIELDS, "revision_template")
    results = []
    for prompt in prompts:
        initial = _call(generate, prompt)
        critiques = tuple((principle, _call(generate, critique_template.format(
            prompt=prompt, response=initial, principle=principle))) for principle in principles)
        revision = _call(generate, revision_template.format(prompt=prompt, response=initial,
                                                            critiques=render_critiques(critiques)))
        results.append(Revised(prompt, initial, critiques, revision))
    return results


def write_pairs(results: Sequence[Revised], path: str | Path) -> tuple[int, int]:
    """Write the preference pairs as JSONL (written aside, then renamed into place).

    A revision identical to its initial response states no preference and is left out. Returns
    (pairs written, pairs left out).
    """
    path = Path(path)
    kept = [r for r in results if r.revision != r.initial]
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r.pair(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(kept), len(results) - len(kept)
