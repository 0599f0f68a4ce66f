"""Chain-of-thought prompts: zero-shot ("Let's think step by step", Kojima et al. 2022) and
few-shot with worked examples (Wei et al. 2022), and the extraction of the final answer.

Worked examples end with "The answer is X.", so a model that follows them ends the same way and
`extract_answer` can read the answer off the reasoning without a second call.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

ZERO_SHOT_TRIGGER = "Let's think step by step."
ANSWER_PREFIX = "The answer is"
# the last "the answer is", an optional colon, then the answer up to a sentence end or a line end
_ANSWER = re.compile(r"\bthe answer is\b\s*:?[ \t]*(.*?)[ \t]*(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)
_WRAPPERS = "*_`\"' \t"


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value.strip()


@dataclass(frozen=True)
class Example:
    """A worked example: question, reasoning, and the answer the reasoning reaches."""
    question: str
    reasoning: str
    answer: str

    def __post_init__(self):
        for name in ("question", "reasoning", "answer"):
            _text(getattr(self, name), f"Example.{name}")
        if self.answer.strip().endswith("."):
            raise ValueError(f"Example.answer={self.answer!r} must not end with a period: the template adds it")

    def render(self) -> str:
        return f"Q: {self.question.strip()}\nA: {self.reasoning.strip()} {ANSWER_PREFIX} {self.answer.strip()}."


def zero_shot_prompt(question: str) -> str:
    """`Q: question` then `A: Let's think step by step.`, for the model to continue."""
    return f"Q: {_text(question, 'question')}\nA: {ZERO_SHOT_TRIGGER}"


def few_shot_prompt(question: str, examples: Sequence[Example]) -> str:
    """The worked examples, a blank line apart, then `Q: question` and `A:` for the model to continue."""
    if not examples or not all(isinstance(e, Example) for e in examples):
        raise ValueError("few-shot prompting needs a non-empty list of Example")
    return "\n\n".join([*(e.render() for e in examples), f"Q: {_text(question, 'question')}\nA:"])


def cot_prompt(question: str, examples: Sequence[Example] = ()) -> str:
    """Few-shot when worked examples are given, zero-shot otherwise."""
    return few_shot_prompt(question, examples) if examples else zero_shot_prompt(question)


def extract_answer(text: str) -> str | None:
    """X of the last "The answer is X" (any case, optional colon, up to a sentence or line end,
    with surrounding bold/quote marks removed); None when the text states no answer."""
    if not isinstance(text, str):
        raise TypeError(f"expected the generated text as a string, got {type(text).__name__}")
    for match in reversed(list(_ANSWER.finditer(text))):
        answer = match.group(1).strip(_WRAPPERS)
        if answer:
            return answer
    return None
