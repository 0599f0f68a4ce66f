"""An in-memory loader of encoded samples (the alignment stages' records, CLIP's image-caption pairs)
that deals them to data-parallel ranks and resumes like the pretraining loader."""
from __future__ import annotations

from collections.abc import Callable

import torch

from tessera.core.config import ConfigError


class SampleLoader:
    """Batches of encoded samples, reshuffled every epoch; each data-parallel rank takes every
    `world_size`-th sample of the epoch's order (all ranks the same number of batches).

    The state is two integers, so a resumed run replays the same batches; `epochs=None` repeats
    forever (training), `epochs=1` is one pass in a fixed order (validation).
    """

    num_workers = 0

    def __init__(self, samples: list, collate: Callable[[list], dict], batch_size: int, rank: int, world_size: int,
                 seed: int = 0, shuffle: bool = True, epochs: int | None = None, skipped: int = 0):
        self.per_rank = len(samples) // world_size // batch_size
        if self.per_rank == 0:
            raise ConfigError(f"{len(samples)} samples make no batch of {batch_size} on each of {world_size} "
                              "rank(s): lower train.batch_size or add data")
        self.samples, self.collate, self.batch_size = samples, collate, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.epochs, self.skipped = shuffle, epochs, skipped
        self.epoch = self.batch = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        return torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            mine = self._order(self.epoch)[self.rank::self.world_size]
            while self.batch < self.per_rank:
                start = self.batch * self.batch_size
                self.batch += 1
                yield self.collate([self.samples[i] for i in mine[start:start + self.batch_size]])
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
