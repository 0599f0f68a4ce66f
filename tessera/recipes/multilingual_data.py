"""Multilingual text, the temperature-sampled language mix, and the per-language measures.

The text is Django's translation catalogs (`django/conf/locale/LL/LC_MESSAGES/*.mo` and those
of `django.contrib.*`): the same interface sentences translated by Django's translators into
about 100 languages, distributed under Django's BSD-3-Clause licence. English is the catalogs'
source strings (`msgid`), the other languages their translations (`msgstr`).
"""
from __future__ import annotations

import random
import re
import struct
from pathlib import Path

# language -> (Django locale directory, script); six scripts, one language each
LANGUAGES = {"en": ("ru", "Latin"), "ru": ("ru", "Cyrillic"), "el": ("el", "Greek"),
             "zh": ("zh_Hans", "Han"), "ar": ("ar", "Arabic"), "hi": ("hi", "Devanagari")}
# Unicode blocks of each script's letters (the basic and extended blocks the six languages use)
SCRIPTS = {
    "Latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)),
    "Cyrillic": ((0x400, 0x52F),),
    "Greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "Han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)),
    "Arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "Devanagari": ((0x900, 0x97F),),
}


def read_mo(path: str | Path) -> dict[str, str]:
    """msgid -> msgstr of a GNU gettext .mo file (either byte order; the header entry left out)."""
    data = Path(path).read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise ValueError(f"{path}: not a gettext .mo file (magic {magic:#x})")
    count, originals, translations = struct.unpack(order + "3I", data[8:20])

    def string(table: int, i: int) -> str:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i: table + 8 * i + 8])
        return data[offset: offset + length].decode("utf-8")

    pairs = {string(originals, i): string(translations, i) for i in range(count)}
    pairs.pop("", None)
    return pairs


_PLACEHOLDER = re.compile(r"%(\(\w+\))?[-+ #0]*\d*(\.\d+)?[sdfr]|\{\w*\}")


def _texts(catalog: str) -> list[str]:
    """The pieces of a catalog entry: context dropped, plural forms apart, format placeholders
    (`%(name)s`, `%s`, `{name}`: code, not language) removed."""
    pieces = (" ".join(_PLACEHOLDER.sub("", t).split()) for t in catalog.split("\x04")[-1].split("\x00"))
    return [t for t in pieces if any(c.isalpha() for c in t)]


def django_messages(language: str) -> list[str]:
    """Every distinct message of Django's catalogs in `language` (a key of LANGUAGES), in a fixed order."""
    import django

    locale, _ = LANGUAGES[language]
    root = Path(django.__file__).parent
    found: dict[str, None] = {}
    for mo in sorted(root.glob(f"**/locale/{locale}/LC_MESSAGES/*.mo")):
        for msgid, msgstr in read_mo(mo).items():
            for text in _texts(msgid if language == "en" else msgstr):
                found.setdefault(text, None)
    if not found:
        raise FileNotFoundError(f"no Django catalogs for {locale!r} under {root}")
    return list(found)


def temperature_weights(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """The sampling probability of each language, p_i ∝ n_i^(1/T): T=1 keeps the natural mix,
    larger T flattens it towards uniform (T→∞), T<1 sharpens it."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ValueError(f"every language needs some text: {sizes}")
    powered = {k: n ** (1.0 / temperature) for k, n in sizes.items()}
    total = sum(powered.values())
    return {k: v / total for k, v in powered.items()}


def temperature_mix(texts: dict[str, list[str]], temperature: float, total_chars: int, seed: int) -> list[str]:
    """About `total_chars` characters of messages in which each language holds its temperature
    share: a language's messages are cycled through in a seeded order until its share is filled
    (so a small language is repeated, a large one subsampled), then everything is shuffled."""
    weights = temperature_weights({k: sum(map(len, v)) for k, v in texts.items()}, temperature)
    rng = random.Random(seed)
    mixed: list[str] = []
    for language, messages in texts.items():
        order = rng.sample(messages, len(messages))
        budget, i = weights[language] * total_chars, 0
        while budget > 0:
            mixed.append(order[i % len(order)])
            budget -= len(mixed[-1])
            i += 1
    rng.shuffle(mixed)
    return mixed


def fertility(encode, texts: list[str]) -> dict[str, float]:
    """Tokens per whitespace-separated word and per character (whitespace excluded) of `texts`
    under `encode` (text -> token ids). Scripts written without spaces (Han) count a run of
    characters between spaces as one word, so compare them per character."""
    tokens = sum(len(encode(t)) for t in texts)
    words = sum(len(t.split()) for t in texts)
    chars = sum(len("".join(t.split())) for t in texts)
    if not words:
        raise ValueError("fertility needs some non-blank text")
    return {"tokens_per_word": tokens / words, "tokens_per_char": tokens / chars}


def script_of(char: str) -> str | None:
    """The script (a key of SCRIPTS) of a letter, None for anything else (digits, punctuation, other scripts)."""
    code = ord(char)
    for script, blocks in SCRIPTS.items():
        if any(lo <= code <= hi for lo, hi in blocks):
            return script
    return None


def script_share(text: str, script: str) -> float:
    """The share of `text`'s letters (`str.isalpha`) that are in `script`; 0 for a text without letters."""
    letters = [c for c in text if c.isalpha()]
    return sum(script_of(c) == script for c in letters) / len(letters) if letters else 0.0


def in_script(text: str, script: str, threshold: float = 0.5) -> bool:
    """Whether `text` is written in `script`: more than `threshold` of its letters are. Exact for
    the six languages here, whose scripts share no letters (a language ID model is not needed)."""
    return script_share(text, script) > threshold
