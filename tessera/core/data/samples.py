"""An in-memory loader of encoded samples (the alignment stages' records, CLIP's image-caption pairs)
that deals them to data-parallel ranks and resumes like the pretraining loader."""
from __future__ import annotations

from collections.abc import Callable

import torch

from tessera.core.config import ConfigError


class SampleLoader:
    """Batches of encoded samples, reshuffled every epoch; each data-parallel rank takes every
    `world_size`-th item of the epoch (all ranks the same number of batches, the fewer than
    `world_size` x `batch_size` items left over sit that epoch out).

    The items are the samples, or what `group` makes of the epoch's ordered samples (token-budget
    rows: `data.max_tokens`), so a budget row holds other samples every epoch. The state is two
    integers, so a resumed run replays the same batches; `epochs=None` repeats forever
    (training), `epochs=1` is one pass in a fixed order (validation).
    """

    num_workers = 0

    def __init__(self, samples: list, collate: Callable[[list], dict], batch_size: int, rank: int, world_size: int,
                 seed: int = 0, shuffle: bool = True, epochs: int | None = None, skipped: int = 0,
                 group: Callable[[list], list] | None = None):
        self.samples, self.collate, self.batch_size = samples, collate, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.epochs, self.skipped = shuffle, epochs, skipped
        self.group = group
        self._items: tuple[int | None, list] = (None, [])
        self.epoch = self.batch = 0
        if self.per_rank(self.items(0)) == 0:
            what = "token-budget rows" if group else "samples"
            raise ConfigError(f"{len(samples)} samples ({len(self.items(0))} {what}) make no batch of {batch_size} "
                              f"on each of {world_size} rank(s): lower train.batch_size or add data")

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        return torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def items(self, epoch: int) -> list:
        """What the batches of `epoch` are made of, in the epoch's order (the last epoch's kept:
        grouping, packing, is the costly part)."""
        if self._items[0] != epoch:
            ordered = [self.samples[i] for i in self._order(epoch)]
            self._items = (epoch, self.group(ordered) if self.group else ordered)
        return self._items[1]

    def per_rank(self, items: list) -> int:
        return len(items) // self.world_size // self.batch_size

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            items = self.items(self.epoch)
            mine = items[self.rank::self.world_size]
            while self.batch < self.per_rank(items):
                start = self.batch * self.batch_size
                self.batch += 1
                yield self.collate(mine[start:start + self.batch_size])
            self.epoch, self.batch = self.epoch + 1, 0

    def reset(self) -> None:
        self.epoch = self.batch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "num_workers": 0, "seed": self.seed}

    def resumable_from(self, state: dict) -> bool:
        return state["world_size"] == self.world_size and state["seed"] == self.seed

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]
