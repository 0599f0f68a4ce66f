"""How the rows of an RL batch are spread over data-parallel ranks.

Each rank samples and scores its own prompts; the rows are then gathered, so every rank holds the
whole batch and computes the same advantages (PPO's whitening is over all rows). Mini-batches are
drawn from one permutation that every rank shares, and each rank steps on its equal slice of
every mini-batch with the token means taken over the whole mini-batch. A step on N ranks is then
the step one process takes on the global batch.

The trainers talk to a `LocalRows` (one process: every method the identity); `RankRows` is the
torch.distributed one, so the trainers never call a collective themselves.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class LocalRows:
    """One process holds every row."""

    rank, size = 0, 1

    def gather(self, x: torch.Tensor, unit: int = 1, pad: int = 0) -> torch.Tensor:
        """Every rank's rows of `x` in the order one process would hold them (dim 1 padded to the
        widest rank with `pad`); `unit` rows (a GRPO group) stay together."""
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over ranks (each rank filled in the rows it computed, zeros elsewhere)."""
        return x

    def mine(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of a mini-batch's global row indices."""
        return idx

    def token_share(self, mask: torch.Tensor) -> float:
        """The factor on a slice's token means whose average over ranks (gradients, metrics) is
        the mean over all of the mini-batch's tokens."""
        return 1.0


class RankRows(LocalRows):
    """The data-parallel ranks of `group` (None: the default group), each holding an equal share of
    the prompts; under TP, `group` is this rank's data-parallel peers of the same TP index, whose
    TP peers hold the same rows. The loaders deal a batch's prompts round-robin (rank r holds
    prompts r, r + size, ...), so the gathered rows are interleaved back into that order."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def gather(self, x: torch.Tensor, unit: int = 1, pad: int = 0) -> torch.Tensor:
        if x.dim() not in (1, 2):
            raise ValueError(f"rows gather (B,) or (B, S) tensors, not {tuple(x.shape)}")
        wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo gathers no bool tensors
        if x.dim() == 2:
            width = torch.tensor([x.shape[1]], device=x.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
            wire = F.pad(wire, (0, int(width) - x.shape[1]), value=pad)
        parts = [torch.empty_like(wire) for _ in range(self.size)]
        dist.all_gather(parts, wire.contiguous(), group=self.group)
        stacked = torch.stack(parts).to(x.dtype)  # (ranks, rows, ...)
        blocks = stacked.reshape(self.size, -1, unit, *wire.shape[1:]).transpose(0, 1)
        return blocks.reshape(-1, *wire.shape[1:])

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x

    def mine(self, idx: torch.Tensor) -> torch.Tensor:
        if len(idx) % self.size:
            raise ValueError(f"a mini-batch of {len(idx)} rows does not split over {self.size} ranks")
        return idx.chunk(self.size)[self.rank]

    def token_share(self, mask: torch.Tensor) -> float:
        count = mask.sum().to(torch.float64).reshape(1)
        total = count.clone()
        dist.all_reduce(total, group=self.group)
        return (count * self.size / total).item()
