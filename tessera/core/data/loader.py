"""A streaming, resumable loader of (input, target) token batches from WebDataset shards.

A stream concatenates its shards' tokens and cuts them into (seq_len + 1)-token windows; the
dealing of shards to rank x worker streams, the shuffling, batching and the two-integer state
are `streams.ShardStreams`'.

The window length may change mid-run (progressive sequence length, `set_seq_len`): the epoch
goes on at the new length from the batch that starts at about the same token of each stream,
so a phase neither repeats nor skips much of the epoch, and the length is part of the state.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from tessera.core.data.manifest import DataError, Manifest, Shard
from tessera.core.data.streams import ShardStreams


class ShardReader:
    """Reads token arrays out of a split's shards, and cuts them into fixed-length windows.

    A shard that cannot be read (truncated, a corrupt header, a token id outside the vocabulary
    from flipped bytes) stops the run with an error naming it and why, or with on_error="skip"
    is dropped from that point on with a warning and counted in `skipped`.
    """

    def __init__(self, manifest: Manifest, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}; valid: raise, skip")
        self.manifest, self.on_error = manifest, on_error
        self.dtype = np.dtype(manifest.dtype)
        self.skipped = 0

    def tokens(self, shards: list[Shard]) -> Iterator[np.ndarray]:
        for shard in shards:
            path = Path(self.manifest.root) / shard.name
            try:
                for sample in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None,
                                             workersplitter=None, empty_check=False).decode():
                    tokens = sample["tokens.npy"]
                    if tokens.dtype != self.dtype or tokens.ndim != 1:
                        raise DataError(f"sample {sample['__key__']} holds {tokens.dtype}{list(tokens.shape)}")
                    if tokens.size and int(tokens.max()) >= self.manifest.vocab_size:
                        raise DataError(f"sample {sample['__key__']} holds token id {int(tokens.max())}, outside "
                                        f"the vocabulary of {self.manifest.vocab_size}")
                    yield tokens
            except Exception as e:
                if self.on_error != "skip":
                    raise DataError(f"corrupt or truncated shard {path}: {reason(e)}") from e
                warnings.warn(f"skipping the rest of shard {path}: {reason(e)}")
                self.skipped += 1

    def windows(self, shards: list[Shard], length: int) -> Iterator[np.ndarray]:
        """One pass of consecutive, non-overlapping `length`-token windows over `shards`."""
        buffer = np.zeros(0, dtype=self.dtype)
        for tokens in self.tokens(shards):
            buffer = np.concatenate([buffer, tokens])
            n = len(buffer) // length
            for i in range(n):
                yield buffer[i * length : (i + 1) * length]
            buffer = buffer[n * length :]


def reason(error: BaseException) -> str:
    """The first line of the first non-empty message along an error's causes (webdataset's
    DecodingError has none of its own)."""
    seen = error
    while seen is not None:
        if str(seen).strip():
            line = str(seen).strip().splitlines()[0]
            return line if seen is error else f"{type(seen).__name__}: {line}"
        seen = seen.__cause__ or seen.__context__
    return type(error).__name__


class StreamingLoader(ShardStreams):
    """Batches of (input, target) token windows for one rank, dealt by `ShardStreams`."""

    fewer_shards_hint = "re-prepare with a smaller --shard-tokens or use fewer workers"

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        on_error: str = "raise",
        epochs: int | None = None,
    ):
        super().__init__(manifest.shards(split), f"{split} split of {manifest.root}", batch_size, rank, world_size,
                         num_workers, seed, shuffle, shuffle_buffer, epochs)
        self.manifest, self.split, self.seq_len = manifest, split, seq_len
        self.reader = ShardReader(manifest, on_error)
        self.too_small_reason = (f"a stream holds fewer than batch_size={batch_size} windows of "
                                 f"seq_len+1={seq_len + 1} tokens")
        self.batches_per_epoch(0)  # fail now, not mid-run, when the data cannot feed every stream

    def items(self, shards: list[Shard]) -> Iterator[np.ndarray]:
        return self.reader.windows(shards, self.seq_len + 1)

    def batches_in(self, shards: list[Shard]) -> int:
        return sum(s.tokens for s in shards) // (self.seq_len + 1) // self.batch_size

    def errors_seen(self) -> int:
        return self.reader.skipped

    def collate(self, windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.from_numpy(np.stack(windows).astype(np.int64))
        return data[:, :-1], data[:, 1:]

    def set_seq_len(self, seq_len: int) -> None:
        """Go on with windows of `seq_len` tokens, from the batch of the new length that starts where
        this epoch's read tokens end (rounded up); iterate the loader anew afterwards."""
        if seq_len == self.seq_len:
            return
        read = self.batch * (self.seq_len + 1)
        self.seq_len = seq_len
        self.too_small_reason = (f"a stream holds fewer than batch_size={self.batch_size} windows of "
                                 f"seq_len+1={seq_len + 1} tokens")
        self.batch = -(-read // (seq_len + 1))
        self.batches_per_epoch(self.epoch)  # the data must hold a batch of the new length

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seq_len = state.get("seq_len", self.seq_len)
