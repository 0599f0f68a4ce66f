"""JSON Lines inputs of the fine-tuning stages: one object per line, each parsed by the caller,
and every error naming the file and line (or, with `on_error="skip"`, counted)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tessera.core.data.manifest import DataError

T = TypeVar("T")


def read_records(path: str | Path, parse: Callable[[dict], T], on_error: str = "raise",
                 what: str = "records") -> tuple[list[T], int]:
    """`parse(record)` of every non-blank line, and how many lines were skipped. `parse` raises
    ValueError for a record it cannot use; the message is reported with the file and line."""
    items, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must hold one JSON object")
                items.append(parse(record))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if on_error != "skip":
                    raise DataError(f"{path}:{lineno}: {e}") from None
                skipped += 1
    if not items:
        raise DataError(f"{path}: no usable {what}")
    return items, skipped
