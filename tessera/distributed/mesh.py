"""The layout of the world: dp_replicate x dp_shard x tp ranks as a named DeviceMesh.

Names follow torchtitan. TP is the innermost dimension so that tensor-parallel peers are
neighbouring ranks (the same node, the fast links); the data loader sees only the data-parallel
coordinates, since the ranks of one TP group must read the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tessera.core.config import ConfigError, ParallelConfig

DIM_NAMES = ("dp_replicate", "dp_shard", "tp")


def valid_layouts(world_size: int) -> list[str]:
    return [f"{r}x{s}x{t}" for r in range(1, world_size + 1) for s in range(1, world_size + 1)
            for t in range(1, world_size + 1) if r * s * t == world_size]


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The layout with dp_shard = -1 filled in; an error naming the values when it cannot fit."""
        r, s, t = cfg.dp_replicate, cfg.dp_shard, cfg.tp
        if s == -1 and world_size % (r * t) == 0:
            s = world_size // (r * t)
        if s < 1 or r * s * t != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={cfg.dp_replicate} x parallel.dp_shard={cfg.dp_shard} x "
                f"parallel.tp={cfg.tp} does not fit a world size of {world_size}; valid layouts "
                f"(dp_replicate x dp_shard x tp): {', '.join(valid_layouts(world_size))}")
        return cls(r, s, t, world_size)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1 and self.dp_shard == 1

    def dp_rank(self, rank: int) -> int:
        """Data-parallel rank of global `rank` (ranks are laid out dp_replicate-major, tp innermost)."""
        return rank // self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """A mesh with the dimensions larger than 1 (None for a single process)."""
        sizes = dict(zip(DIM_NAMES, (self.dp_replicate, self.dp_shard, self.tp)))
        names = tuple(n for n in DIM_NAMES if sizes[n] > 1)
        if not names:
            return None
        return init_device_mesh(device_type, tuple(sizes[n] for n in names), mesh_dim_names=names)
