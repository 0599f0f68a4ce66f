"""Code completion measured beyond loss: does a greedy completion of a function parse, is its next
line the original's, does it pass tests.

The tasks come from held-out source files: a function's signature and first statements (after
the file's preceding text, as an editor would hold it) are the prompt; the model's continuation is
cut where it leaves the function (the first non-blank line indented no deeper than the `def`).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FunctionTask:
    """A function of a held-out file: `prefix` (the file before it), `head` (signature and first
    statements, ending with a newline), `next_line` (the original's first non-blank line after
    `head`) and `indent` (the `def` line's indentation)."""

    source: str
    name: str
    prefix: str
    head: str
    next_line: str
    indent: int


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def function_tasks(text: str, source: str = "", max_lines: int = 30) -> list[FunctionTask]:
    """The completion tasks of one file: every function of at most `max_lines` lines with a
    statement left after its head. The head is the signature and the body up to and including the
    first statement that is not a docstring; a file that does not parse gives none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    tasks = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno - node.lineno >= max_lines:
            continue
        body = node.body
        first = next((i for i, s in enumerate(body) if not _is_docstring(s)), None)
        if first is None or first + 1 >= len(body) or body[first].end_lineno >= body[first + 1].lineno:
            continue  # no statement after the head, or two statements on one line
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        head_end = body[first].end_lineno
        rest = [ln for ln in lines[head_end:node.end_lineno] if ln.strip()]
        if not rest:
            continue
        indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        tasks.append(FunctionTask(source, node.name, "".join(lines[:start]), "".join(lines[start:head_end]),
                                  rest[0].rstrip(), indent))
    return sorted(tasks, key=lambda t: len(t.prefix))


def after_head(head: str, output: str) -> str:
    """What the model wrote after `head`, given that it was prompted with `head` less its final
    newline (a prompt ending in a bare newline token would tell a byte-level BPE model that the next
    line is not indented, since indentation is merged into the newline's token). Output that does not
    start a new line rewrote the head's last line: nothing of it counts."""
    return output[1:] if output.startswith("\n") else ""


def cut_at_dedent(completion: str, indent: int) -> str:
    """The part of `completion` still inside the function: up to the first non-blank line indented
    no deeper than `indent` (the `def`'s), without trailing blank lines."""
    kept = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        kept.append(line)
    return "".join(kept).rstrip() + ("\n" if "".join(kept).strip() else "")


def parses(task: FunctionTask, completion: str) -> bool:
    """Whether the head plus the completion (cut at the dedent) is a function `ast.parse` accepts,
    the completion adding at least one line (an empty completion of a head that parses does not count)."""
    body = cut_at_dedent(completion, task.indent)
    if not body.strip():
        return False
    try:
        ast.parse(textwrap.dedent(task.head + body))
    except (SyntaxError, ValueError):
        return False
    return True


def next_line_matches(task: FunctionTask, completion: str) -> bool:
    """Whether the completion's first non-blank line is the original's (trailing spaces aside)."""
    first = next((ln for ln in completion.splitlines() if ln.strip()), None)
    return first is not None and first.rstrip() == task.next_line


PASSED = "all asserts passed"


@dataclass(frozen=True)
class TestedTask:
    """A self-written function to complete (`head`: signature and docstring) and the asserts its
    completion must pass."""

    name: str
    head: str
    tests: str


def passes(task: TestedTask, completion: str, timeout_s: float = 5.0) -> bool:
    """Run head + completion + tests in a fresh, isolated interpreter (`python -I`) in an empty
    temporary directory, with a time limit: a pass is exit 0 after the last assert (a line the
    program prints at its end; a completion that exits early does not pass); an error, a failed
    assert or the timeout is not. Never run in this process."""
    program = task.head + cut_at_dedent(completion, 0) + "\n\n" + task.tests + f"\nprint({PASSED!r})\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.py"
        path.write_text(program, encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, timeout=timeout_s,
                                  env={"PATH": os.environ.get("PATH", "")}, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0 and proc.stdout.decode(errors="replace").splitlines()[-1:] == [PASSED]


def _task(name: str, signature: str, doc: str, tests: str) -> TestedTask:
    return TestedTask(name, f'{signature}\n    """{doc}"""\n', textwrap.dedent(tests))


# Self-written for this recipe: small functions of the kind the standard library is full of.
TESTED_TASKS = [
    _task("add", "def add(a, b):", "Return the sum of a and b.", "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"),
    _task("is_even", "def is_even(n):", "Return True if n is even.", "assert is_even(4)\nassert not is_even(7)\n"),
    _task("maximum", "def maximum(items):", "Return the largest item of a non-empty list.",
          "assert maximum([3, 9, 2]) == 9\nassert maximum([-5]) == -5\n"),
    _task("reverse", "def reverse(s):", "Return the string s reversed.", "assert reverse('abc') == 'cba'\n"),
    _task("count_vowels", "def count_vowels(text):", "Return the number of vowels (aeiou) in text.",
          "assert count_vowels('hello world') == 3\nassert count_vowels('xyz') == 0\n"),
    _task("square_all", "def square_all(numbers):", "Return a list of the squares of numbers.",
          "assert square_all([1, 2, 3]) == [1, 4, 9]\nassert square_all([]) == []\n"),
    _task("factorial", "def factorial(n):", "Return n! for n >= 0.",
          "assert factorial(0) == 1\nassert factorial(5) == 120\n"),
    _task("is_palindrome", "def is_palindrome(s):", "Return True if s reads the same backwards.",
          "assert is_palindrome('level')\nassert not is_palindrome('python')\n"),
    _task("clamp", "def clamp(value, low, high):", "Return value limited to the range [low, high].",
          "assert clamp(5, 0, 3) == 3\nassert clamp(-2, 0, 3) == 0\nassert clamp(2, 0, 3) == 2\n"),
    _task("first_word", "def first_word(text):", "Return the first whitespace-separated word of text.",
          "assert first_word('hello big world') == 'hello'\n"),
    _task("join_lines", "def join_lines(lines):", "Return the lines joined with newline characters.",
          "assert join_lines(['a', 'b']) == 'a\\nb'\n"),
    _task("get_default", "def get_default(mapping, key, default=None):",
          "Return mapping[key] if the key is present, else default.",
          "assert get_default({'a': 1}, 'a') == 1\nassert get_default({}, 'b', 7) == 7\n"),
    _task("unique", "def unique(items):", "Return the items without duplicates, in first-seen order.",
          "assert unique([3, 1, 3, 2, 1]) == [3, 1, 2]\n"),
    _task("fibonacci", "def fibonacci(n):", "Return the n-th Fibonacci number (fibonacci(0) == 0).",
          "assert fibonacci(0) == 0\nassert fibonacci(1) == 1\nassert fibonacci(10) == 55\n"),
    _task("flatten", "def flatten(lists):", "Return one list of the items of a list of lists.",
          "assert flatten([[1, 2], [3], []]) == [1, 2, 3]\n"),
    _task("word_count", "def word_count(text):", "Return a dict of how many times each word occurs in text.",
          "assert word_count('a b a') == {'a': 2, 'b': 1}\n"),
]
