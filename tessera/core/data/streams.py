"""Resumable rank x worker streams over a split's shards: the dealing, batching and state that
every shard loader shares (token windows in `loader.py`, image-text pairs in `tessera.multimodal`).

Determinism is the design constraint: the batches of an epoch are a pure function of
(seed, epoch, rank, world size, worker count), so the state is two integers and a resumed run
replays exactly the batches an uninterrupted run would have seen.

Each epoch the shard list is shuffled with a seed that depends on the epoch, then dealt
round-robin to world_size x num_workers streams. A stream reads its shards' items in order,
shuffles them through a buffer and batches them. Every stream yields the same number of batches
(the smallest stream's count), so ranks never wait on each other at the end of an epoch; the few
items the larger streams hold beyond that are left out of that epoch.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.core.data.manifest import DataError


class _StreamDataset(IterableDataset):
    """The batches of one epoch for every stream of one rank; runs in DataLoader workers."""

    def __init__(self, streams: "ShardStreams", epoch: int, start: int):
        self.streams, self.epoch, self.start = streams, epoch, start

    def __iter__(self):
        info = get_worker_info()
        n_workers = info.num_workers if info else 1
        worker = info.id if info else 0
        logical = (worker + self.start) % n_workers  # the stream whose turn comes first after `start`
        skip = max(0, -(-(self.start - logical) // n_workers))
        try:
            yield from self.streams.stream_batches(self.epoch, logical, skip)
        except DataError as e:  # raised again by the main process, in one line, not wrapped in the worker's traceback
            yield e, 0


class ShardStreams:
    """The batches of one rank; iterate it for an endless stream (or `epochs` passes), and save
    `state_dict()` with every checkpoint. A subclass says what a shard holds: `items` (one pass
    over some shards), `ready` (an item made usable, or None to skip it), `collate`, `batches_in`
    (how many batches some shards make), `errors_seen` (bad data skipped so far in this process)."""

    fewer_shards_hint = "use fewer workers"  # how to fix a split with fewer shards than streams
    too_small_reason = "a stream holds fewer items than one batch"

    def __init__(self, shards: list, where: str, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, shuffle: bool, shuffle_buffer: int, epochs: int | None):
        self.split_shards, self.where = shards, where
        self.batch_size = batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epochs = epochs
        self.epoch, self.batch = 0, 0
        self.skipped = 0

    def items(self, shards: list) -> Iterator[Any]:
        raise NotImplementedError

    def ready(self, item: Any) -> Any:
        return item

    def collate(self, items: list) -> Any:
        raise NotImplementedError

    def batches_in(self, shards: list) -> int:
        raise NotImplementedError

    def errors_seen(self) -> int:
        raise NotImplementedError

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def n_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def assignment(self, epoch: int) -> list[list]:
        """The shards of every stream (all ranks) in `epoch`."""
        shards = list(self.split_shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        if len(shards) < self.n_streams:
            raise DataError(
                f"{self.where} has {len(shards)} shard(s) but {self.world_size} rank(s) x "
                f"{self.streams_per_rank} worker(s) need at least {self.n_streams}: {self.fewer_shards_hint}"
            )
        return [shards[i :: self.n_streams] for i in range(self.n_streams)]

    def batches_per_epoch(self, epoch: int) -> int:
        counts = [self.batches_in(stream) for stream in self.assignment(epoch)]
        if min(counts) == 0:
            raise DataError(f"{self.where} is too small: {self.too_small_reason}")
        return min(counts) * self.streams_per_rank

    def reset(self) -> None:
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed}

    def resumable_from(self, state: dict) -> bool:
        """Whether `state` came from a loader with this one's layout, so its order can be replayed."""
        return all(state[k] == getattr(self, k) for k in ("world_size", "num_workers", "seed"))

    def load_state_dict(self, state: dict) -> None:
        layout = {k: state[k] for k in ("world_size", "num_workers", "seed")}
        mine = {k: getattr(self, k) for k in layout}
        if layout != mine:
            raise DataError(f"loader state was saved with {layout}, this run has {mine}: the data order cannot be resumed")
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self) -> Iterator[Any]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.batch < self.batches_per_epoch(self.epoch):
                for batch, skipped in self._epoch(self.epoch, self.batch):
                    if isinstance(batch, DataError):
                        raise batch
                    self.batch += 1
                    self.skipped += int(skipped)
                    yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    def _epoch(self, epoch: int, start: int):
        dataset = _StreamDataset(self, epoch, start)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers))

    def stream_batches(self, epoch: int, worker: int, skip: int):
        """(batch, bad data skipped since the last batch) of one (rank, worker) stream in `epoch`,
        after the first `skip` batches."""
        index = self.rank * self.streams_per_rank + worker
        shards = self.assignment(epoch)[index]
        per_stream = self.batches_per_epoch(epoch) // self.streams_per_rank
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        items = self._passes(shards, rng)
        reported = self.errors_seen()
        batch: list = []
        produced = 0
        for item in items:
            batch.append(item)
            if len(batch) < self.batch_size:
                continue
            if produced >= skip:
                yield self.collate(batch), self.errors_seen() - reported
                reported = self.errors_seen()
            batch, produced = [], produced + 1
            if produced == per_stream:
                return

    def _passes(self, shards: list, rng: random.Random) -> Iterator[Any]:
        """Shuffled passes over the stream's items; a stream left short by skipped data starts
        another pass rather than stall its rank."""
        while True:
            items = self.items(shards)
            if self.shuffle:
                items = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(items)
            yielded = False
            for item in items:
                item = self.ready(item)
                if item is None:
                    continue
                yielded = True
                yield item
            if not yielded:
                raise DataError(f"no readable items in shards {[getattr(s, 'name', s) for s in shards]}")
