"""Files a run keeps (checkpoints, metrics.jsonl): written aside and renamed, readable by the team,
and a full disk reported in one line.

A kill -9 or a full disk at any moment leaves either the old file or the new one, never a
truncated one. Files get the permissions the umask gives (0644 under the usual 022), like
every other file a run writes: safetensors writes 0600, which teammates on a shared
filesystem could not read.
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StorageError(ValueError):
    """A file the run must keep cannot be written (no space left): one line naming the path, exit 2."""


def no_space(error: BaseException) -> bool:
    """Whether `error` says the disk (or quota) is full: an OSError, or safetensors' Rust I/O error."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    return any(f"(os error {n})" in str(error) for n in NO_SPACE)


@contextmanager
def written_aside(tmp: Path, final: Path) -> Iterator[None]:
    """Writes into `tmp` (a file or directory) that will become `final`: on any failure, a kill by
    Ctrl-C included, `tmp` is removed; a full disk becomes a StorageError naming `final`."""
    try:
        yield
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if no_space(e):
            raise StorageError(f"cannot write {final}: no space left on device") from None
        raise


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, so that a full disk raises OSError(ENOSPC), not a zip-writer error."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text`: written to a hidden sibling, flushed, and renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with written_aside(tmp, path):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        share(tmp)
        os.replace(tmp, path)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def share(path: Path) -> None:
    """Give `path` (and every file and directory below it) the modes the umask gives new files and directories."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
