"""JSON Lines inputs (corpora, instructions, preference pairs, prompts): one object per line,
each parsed by the caller, and every error naming the file and line (or, with
`on_error="skip"`, counted)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tessera.core.data.manifest import DataError

T = TypeVar("T")


def numbered_objects(path: str | Path) -> Iterator[tuple[int, dict | ValueError]]:
    """(line number, the line's JSON object, or the ValueError saying why it is not one) for every
    non-blank line, read lazily so that large corpora stream."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"not UTF-8 text (byte {e.start} of the line is {raw[e.start]:#04x})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"not valid JSON ({e.msg})")
                continue
            yield lineno, record if isinstance(record, dict) else ValueError("a line must hold one JSON object")


def read_records(path: str | Path, parse: Callable[[dict], T], on_error: str = "raise",
                 what: str = "records") -> tuple[list[T], int]:
    """`parse(record)` of every non-blank line, and how many lines were skipped. `parse` raises
    ValueError for a record it cannot use; the message is reported with the file and line."""
    items, skipped = [], 0
    for lineno, record in numbered_objects(path):
        try:
            if isinstance(record, ValueError):
                raise record
            items.append(parse(record))
        except ValueError as e:
            if on_error != "skip":
                raise DataError(f"{path}:{lineno}: {e}") from None
            skipped += 1
    if not items:
        raise DataError(f"{path}: no usable {what}")
    return items, skipped
