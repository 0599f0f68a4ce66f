"""Turn text files into WebDataset shards of token arrays plus a manifest.

Documents (a .txt file, or one line of a .jsonl file) are tokenized and joined with the eos
token; the first (1 - val_fraction) of the token stream is the train split, the rest is val, or
(`val_inputs`) the split is by file.
Each shard holds `shard_tokens` tokens as samples of at most `sample_tokens` tokens stored as
`.npy`; by default (0) shards are sized so that every split has at least MIN_SHARDS of them,
enough for 8 data-parallel ranks even on a small corpus, and at most DEFAULT_SHARD_TOKENS
tokens. Shards and the manifest are written under temporary names and renamed into place.

Directories are searched recursively for .txt and .jsonl files, leaving out hidden files and
directories (.git, editor files); the manifest lists the files read and counts the input the
tokenizer could only map to its unknown token. A file that is not UTF-8 is named with the byte.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from tessera.core.data.jsonl import numbered_objects
from tessera.core.data.manifest import MANIFEST, DataError, Manifest, Shard
from tessera.core.tokenizer import Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 20
MIN_SHARDS = 8  # the data-parallel size a small corpus should still feed (world size x loader workers)


def input_files(inputs: list[str]) -> list[Path]:
    """The .txt and .jsonl files named by `inputs` (files, or directories searched recursively)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise DataError(f"{path}: only .txt and .jsonl inputs are supported")
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not files:
        raise DataError(f"no .txt or .jsonl files in {', '.join(inputs)}")
    return files


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Yield each document's text; a bad JSONL line is an error naming the file and line."""
    for path in files:
        if path.suffix == ".txt":
            data = path.read_bytes()
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None
            continue
        for lineno, record in numbered_objects(path):
            if isinstance(record, ValueError):
                raise DataError(f"{path}:{lineno}: {record}")
            if not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{lineno}: no string field {text_field!r}")
            yield record[text_field]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _write_shard(path: Path, tokens: np.ndarray, sample_tokens: int) -> int:
    """Write one tar shard atomically; returns its number of samples."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with wds.TarWriter(str(tmp)) as sink:
        for start in range(0, len(tokens), sample_tokens):
            buf = io.BytesIO()
            np.save(buf, tokens[start : start + sample_tokens], allow_pickle=False)
            sink.write({"__key__": f"{n:08d}", "tokens.npy": buf.getvalue()})
            n += 1
    os.replace(tmp, path)
    return n


def _write_split(out: Path, split: str, tokens: np.ndarray, shard_tokens: int, sample_tokens: int) -> list[Shard]:
    """The split's shards; `shard_tokens` 0 sizes them for at least MIN_SHARDS shards (fewer only below that many tokens)."""
    shard_tokens = shard_tokens or max(1, min(DEFAULT_SHARD_TOKENS, math.ceil(len(tokens) / MIN_SHARDS)))
    shards = []
    for i, start in enumerate(tqdm(range(0, len(tokens), shard_tokens), desc=f"{split} shards", unit="shard")):
        chunk = tokens[start : start + shard_tokens]
        name = f"{split}-{i:06d}.tar"
        shards.append(Shard(name, len(chunk), _write_shard(out / name, chunk, sample_tokens)))
    return shards


def _tokenize(files: list[Path], tokenizer: Tokenizer, text_field: str, dtype: np.dtype, desc: str
              ) -> tuple[np.ndarray, int, set[str]]:
    """The documents of `files` as one eos-joined token stream, with the count of unknown tokens
    and some of the characters behind them."""
    pieces: list[np.ndarray] = []
    unknown, unknown_chars = 0, set()
    for doc in tqdm(read_documents(files, text_field), desc=desc, unit="doc"):
        if pieces:
            pieces.append(np.array([tokenizer.eos_id], dtype=dtype))
        pieces.append(np.asarray(tokenizer.encode(doc), dtype=dtype))
        if tokenizer.unk_id is not None and (n := int((pieces[-1] == tokenizer.unk_id).sum())):
            unknown += n
            if len(unknown_chars) < 20:
                unknown_chars |= {c for c in set(doc) if tokenizer.encode(c) == [tokenizer.unk_id]}
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype)), unknown, unknown_chars


def prepare(
    inputs: list[str],
    tokenizer: Tokenizer,
    out: str | Path,
    val_fraction: float = 0.1,
    shard_tokens: int = 0,
    sample_tokens: int = 4096,
    text_field: str = "text",
    val_inputs: list[str] | None = None,
) -> Manifest:
    """Shards of `inputs` split by `val_fraction` of the token stream, or, with `val_inputs`, split by
    file: `inputs` are the train split and `val_inputs` the val split (`val_fraction` unused)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 0 or sample_tokens <= 0:
        raise DataError("--shard-tokens must be >= 0 (0: sized for 8 shards a split) and --sample-tokens positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    files = input_files(inputs)
    tokens, unknown, unknown_chars = _tokenize(files, tokenizer, text_field, dtype, "tokenizing")
    if val_inputs:
        val_files = input_files(val_inputs)
        val_tokens, val_unknown, val_chars = _tokenize(val_files, tokenizer, text_field, dtype, "tokenizing val")
        files, unknown, unknown_chars = [*files, *val_files], unknown + val_unknown, unknown_chars | val_chars
        if len(tokens) < 2 or len(val_tokens) < 2:
            raise DataError(f"inputs hold {len(tokens)} tokens and val inputs {len(val_tokens)}; each needs 2 or more")
    else:
        n_train = int(len(tokens) * (1.0 - val_fraction))
        tokens, val_tokens = tokens[:n_train], tokens[n_train:]
    if unknown:
        warnings.warn(f"{unknown:,} characters of the input are not in the tokenizer's vocabulary and became its "
                      f"unknown token (among them {''.join(sorted(unknown_chars)[:20])!r})", stacklevel=2)
    if len(tokens) + len(val_tokens) < 2:
        raise DataError(f"inputs hold {len(tokens) + len(val_tokens)} tokens; nothing to train on")
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob("*.tar"):
        stale.unlink()
    splits = {"train": _write_split(out, "train", tokens, shard_tokens, sample_tokens)}
    if len(val_tokens):
        splits["val"] = _write_split(out, "val", val_tokens, shard_tokens, sample_tokens)
    tokenizer.save(out)
    manifest = Manifest(out, dtype.name, tokenizer.vocab_size, tokenizer.hash, splits, sources=[str(f) for f in files],
                        unknown_tokens=unknown, unknown_chars="".join(sorted(unknown_chars)[:20]))
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out / MANIFEST)
    return manifest
