"""Checkable instruction tasks for the assistant recipe, and the rule that judges an answer.

Four kinds of prompt, each with exactly one right answer that `solve` recomputes from the
prompt's text alone (not from the generator's answer, so the judge is independent of it):
    "Reverse the word: qorin"            -> "niroq"
    "Sort the words: pear fig apple"     -> "apple fig pear"
    "Count the letter a in: banaxa"      -> "3"
    "Add: 17 + 25"                       -> "42"
`judge(prompt, response)` is 1 when the response, stripped of surrounding whitespace, equals
that answer, else 0. A DPO answer beats the SFT one on a prompt when it scores higher; equal
scores are a tie, worth half a win.
"""
from __future__ import annotations

import random
import re

WORDS = ("apple", "river", "stone", "light", "green", "house", "cloud", "tiger", "bread", "music", "plant",
         "water", "chair", "night", "storm", "sugar", "dream", "field", "ocean", "candle", "garden", "silver",
         "mirror", "winter", "forest", "pepper", "rabbit", "yellow", "bottle", "window", "fig", "pear", "lamp",
         "bird", "moon", "salt", "rain", "wolf", "rose", "king")
KINDS = ("reverse", "sort", "count", "add")

_PATTERNS = {
    "reverse": re.compile(r"Reverse the word: ([a-z]+)$"),
    "sort": re.compile(r"Sort the words: ([a-z]+(?: [a-z]+)+)$"),
    "count": re.compile(r"Count the letter ([a-z]) in: ([a-z]+)$"),
    "add": re.compile(r"Add: (\d+) \+ (\d+)$"),
}


def make_task(kind: str, rng: random.Random) -> tuple[str, str]:
    """A (prompt, answer) pair of `kind`, drawn with `rng`."""
    if kind == "reverse":
        prompt = f"Reverse the word: {_letters(rng)}"
    elif kind == "sort":
        prompt = "Sort the words: " + " ".join(rng.sample(WORDS, rng.randint(3, 4)))
    elif kind == "count":
        word = _letters(rng)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        prompt = f"Count the letter {letter} in: {word}"
    elif kind == "add":
        prompt = f"Add: {rng.randint(0, 49)} + {rng.randint(0, 49)}"
    else:
        raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(KINDS)}")
    return prompt, solve(prompt)


def _letters(rng: random.Random) -> str:
    """A made-up lowercase word of 3 to 6 letters (so held-out words are new words, not recalled ones)."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def solve(prompt: str) -> str:
    """The one right answer to a prompt of one of the four kinds; ValueError for any other text."""
    for kind, pattern in _PATTERNS.items():
        m = pattern.match(prompt)
        if m is None:
            continue
        if kind == "reverse":
            return m.group(1)[::-1]
        if kind == "sort":
            return " ".join(sorted(m.group(1).split()))
        if kind == "count":
            return str(m.group(2).count(m.group(1)))
        return str(int(m.group(1)) + int(m.group(2)))
    raise ValueError(f"not a task prompt: {prompt!r}")


def judge(prompt: str, response: str) -> int:
    """1 when `response` (whitespace-stripped) is the prompt's answer, else 0."""
    return int(response.strip() == solve(prompt))


def win_rate(prompts: list[str], challenger: list[str], baseline: list[str]) -> dict[str, float]:
    """Wins, ties and losses of `challenger` over `baseline` under `judge`; win_rate = (wins + ties / 2) / n."""
    if not prompts or not len(prompts) == len(challenger) == len(baseline):
        raise ValueError("win_rate needs one challenger and one baseline response per prompt, and some prompts")
    diffs = [judge(p, c) - judge(p, b) for p, c, b in zip(prompts, challenger, baseline)]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    ties = len(diffs) - wins - losses
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / len(diffs)}


def wrong_answer(prompt: str, rng: random.Random) -> str:
    """A plausible wrong answer (the rejected side of a pair when the model answered right)."""
    answer = solve(prompt)
    if answer.isdigit():
        return str(int(answer) + rng.choice((-2, -1, 1, 2)) if int(answer) > 1 else int(answer) + 1)
    words = answer.split()
    if len(words) > 1:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    original = _PATTERNS["reverse"].match(prompt).group(1)
    return original if original != answer else answer + answer[-1]


def task_set(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """`n` distinct (prompt, answer) pairs, the kinds in turn, drawn from `seed`, none of whose
    prompts is in `exclude` (the held-out prompts stay unseen in training)."""
    rng = random.Random(seed)
    tasks: dict[str, str] = {}
    while len(tasks) < n:
        prompt, answer = make_task(KINDS[len(tasks) % len(KINDS)], rng)
        if prompt not in exclude:
            tasks.setdefault(prompt, answer)
    return list(tasks.items())
