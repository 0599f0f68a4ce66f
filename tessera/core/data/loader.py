"""A streaming, resumable loader of (input, target) token batches from WebDataset shards.

Determinism is the design constraint: the batches of an epoch are a pure function of
(seed, epoch, rank, world size, worker count), so the loader's state is two integers and a
resumed run replays exactly the batches an uninterrupted run would have seen.

Each epoch the shard list is shuffled with a seed that depends on the epoch, then dealt
round-robin to world_size x num_workers streams. A stream concatenates its shards' tokens,
cuts them into (seq_len + 1)-token windows, shuffles the windows through a buffer and batches
them. Every stream yields the same number of batches (the smallest stream's count, known from
the manifest), so ranks never wait on each other at the end of an epoch; the few windows the
larger streams hold beyond that are left out of that epoch.

The window length may change mid-run (progressive sequence length, `set_seq_len`): the epoch
goes on at the new length from the batch that starts at about the same token of each stream,
so a phase neither repeats nor skips much of the epoch, and the length is part of the state.
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.core.data.manifest import DataError, Manifest, Shard


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


class _StreamDataset(IterableDataset):
    """The batches of one epoch for every stream of one rank; runs in DataLoader workers."""

    def __init__(self, loader: "StreamingLoader", epoch: int, start: int):
        self.loader, self.epoch, self.start = loader, epoch, start

    def __iter__(self):
        info = get_worker_info()
        n_workers = info.num_workers if info else 1
        worker = info.id if info else 0
        logical = (worker + self.start) % n_workers  # the stream whose turn comes first after `start`
        skip = max(0, -(-(self.start - logical) // n_workers))
        yield from self.loader.stream_batches(self.epoch, logical, skip)


class StreamingLoader:
    """Batches of (input, target) token windows for one rank; iterate it for an endless stream
    (or `epochs` passes), and save `state_dict()` with every checkpoint."""

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
        self.manifest, self.split = manifest, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epochs = epochs
        self.epoch, self.batch = 0, 0
        self.reader = ShardReader(manifest, on_error)
        self.skipped = 0
        self.batches_per_epoch(0)  # fail now, not mid-run, when the data cannot feed every stream

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def n_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def assignment(self, epoch: int) -> list[list[Shard]]:
        """The shards of every stream (all ranks) in `epoch`."""
        shards = list(self.manifest.shards(self.split))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        if len(shards) < self.n_streams:
            raise DataError(
                f"{self.split} split of {self.manifest.root} has {len(shards)} shard(s) but "
                f"{self.world_size} rank(s) x {self.streams_per_rank} worker(s) need at least "
                f"{self.n_streams}: re-prepare with a smaller --shard-tokens or use fewer workers"
            )
        return [shards[i :: self.n_streams] for i in range(self.n_streams)]

    def batches_per_epoch(self, epoch: int) -> int:
        window = self.seq_len + 1
        counts = [sum(s.tokens for s in stream) // window // self.batch_size for stream in self.assignment(epoch)]
        if min(counts) == 0:
            raise DataError(
                f"{self.split} split of {self.manifest.root} is too small: a stream holds fewer than "
                f"batch_size={self.batch_size} windows of seq_len+1={window} tokens"
            )
        return min(counts) * self.streams_per_rank

    def reset(self) -> None:
        self.epoch, self.batch = 0, 0

    def set_seq_len(self, seq_len: int) -> None:
        """Go on with windows of `seq_len` tokens, from the batch of the new length that starts where
        this epoch's read tokens end (rounded up); iterate the loader anew afterwards."""
        if seq_len == self.seq_len:
            return
        read = self.batch * (self.seq_len + 1)
        self.seq_len = seq_len
        self.batch = -(-read // (seq_len + 1))
        self.batches_per_epoch(self.epoch)  # the data must hold a batch of the new length

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed, "seq_len": self.seq_len}

    def resumable_from(self, state: dict) -> bool:
        """Whether `state` came from a loader with this one's layout, so its order can be replayed."""
        return all(state[k] == getattr(self, k) for k in ("world_size", "num_workers", "seed"))

    def load_state_dict(self, state: dict) -> None:
        layout = {k: state[k] for k in ("world_size", "num_workers", "seed")}
        mine = {k: getattr(self, k) for k in layout}
        if layout != mine:
            raise DataError(f"loader state was saved with {layout}, this run has {mine}: the data order cannot be resumed")
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.seq_len = state.get("seq_len", self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.batch < self.batches_per_epoch(self.epoch):
                for x, y, skipped in self._epoch(self.epoch, self.batch):
                    self.batch += 1
                    self.skipped += int(skipped)
                    yield x, y
            self.epoch, self.batch = self.epoch + 1, 0

    def _epoch(self, epoch: int, start: int):
        dataset = _StreamDataset(self, epoch, start)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers))

    def stream_batches(self, epoch: int, worker: int, skip: int):
        """The batches of one (rank, worker) stream in `epoch`, after the first `skip`."""
        index = self.rank * self.streams_per_rank + worker
        shards = self.assignment(epoch)[index]
        per_stream = self.batches_per_epoch(epoch) // self.streams_per_rank
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        windows = self._passes(shards, rng)
        reported_skips = self.reader.skipped
        batch: list[np.ndarray] = []
        produced = 0
        for window in windows:
            batch.append(window)
            if len(batch) < self.batch_size:
                continue
            if produced >= skip:
                data = torch.from_numpy(np.stack(batch).astype(np.int64))
                yield data[:, :-1], data[:, 1:], self.reader.skipped - reported_skips
                reported_skips = self.reader.skipped
            batch, produced = [], produced + 1
            if produced == per_stream:
                return

    def _passes(self, shards: list[Shard], rng: random.Random) -> Iterator[np.ndarray]:
        """Shuffled passes over the stream's windows; a stream left short by skipped shards starts
        another pass rather than stall its rank."""
        while True:
            windows = self.reader.windows(shards, self.seq_len + 1)
            if self.shuffle:
                windows = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(windows)
            yielded = False
            for w in windows:
                yielded = True
                yield w
            if not yielded:
                raise DataError(f"no readable windows in shards {[s.name for s in shards]}")
