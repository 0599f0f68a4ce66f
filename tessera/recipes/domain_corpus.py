"""The domain corpus of the fine-tuning recipe: the mathematical prose of SymPy's docstrings.

SymPy (a dependency of PyTorch, so on every machine that runs Tessera; BSD-3-Clause) documents
each module, class and function in English prose about algebra, calculus, number theory,
geometry and physics. The prose paragraphs of those docstrings (doctest examples, reST
directives and section rules left out) are the domain text; the split into training and
held-out text is by source file, so no held-out paragraph shares a file with a training one.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if any(line.lstrip().startswith((">>>", "...", "..", ":")) for line in lines):
        return False  # doctests, reST directives and field lists
    if any(set(line.strip()) <= set("=-~^*") for line in lines):
        return False  # section rules
    words = paragraph.split()
    letters = sum(c.isalpha() for c in paragraph)
    return len(words) >= 8 and letters >= 0.7 * len(paragraph.replace(" ", "").replace("\n", ""))


def docstring_paragraphs(source: str) -> list[str]:
    """The prose paragraphs of every docstring of a Python module's source, each on one line."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                found += [" ".join(p.split()) for p in doc.split("\n\n") if _is_prose(p)]
    return found


def held_out(path: str, percent: int) -> bool:
    """Whether a file belongs to the held-out split: a stable hash of its relative path, not its order."""
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 100 < percent


def sympy_prose(max_chars: int, val_percent: int = 10) -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs of SymPy's docstrings, test modules left out, each split up
    to its share of `max_chars` (files in sorted order, so the same text every time)."""
    import sympy

    root = Path(sympy.__file__).parent
    train: list[str] = []
    val: list[str] = []
    budget = {"train": max_chars * (100 - val_percent) // 100, "val": max_chars * val_percent // 100}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "/tests/" in f"/{rel}" or path.name.startswith("test_"):
            continue
        split, out = ("val", val) if held_out(rel, val_percent) else ("train", train)
        for paragraph in docstring_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            if budget[split] <= 0:
                break
            out.append(paragraph)
            budget[split] -= len(paragraph)
        if budget["train"] <= 0 and budget["val"] <= 0:
            break
    if not train or not val:
        raise ValueError(f"SymPy under {root} gave too little prose ({len(train)} training, {len(val)} held-out paragraphs)")
    return train, val
