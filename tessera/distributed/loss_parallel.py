"""Loss parallelism: the LM head's matmul and cross-entropy on a vocabulary-sharded weight.

With `parallel.loss_parallel` the embedding and LM head weights are sharded by vocabulary rows
over the "tp" mesh (one tensor when tied). Each rank then computes only its slice of the logits,
(tokens, vocab / tp), and three all-reduces over the TP group (max, sum of exponentials, target
logit) give the exact loss; the full logits never exist on any rank.

It plugs in where the model already computes its loss, `kernels.linear_cross_entropy`, as that
op's implementation for DTensor weights (`register`, called by the parallelizer that shards the
head), so the model stays plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from tessera.kernels import dispatch


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight_shard.T` where each rank holds rows
    [start, start + weight_shard.shape[0]) of the vocabulary; `hidden` is the same on all ranks."""

    @staticmethod
    def forward(ctx, hidden, weight_shard, targets, ignore_index, start, group):
        logits = (hidden @ weight_shard.T).float()
        global_max = logits.max(dim=-1).values
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits - global_max[:, None])
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = targets != ignore_index
        local = valid & (targets >= start) & (targets < start + weight_shard.shape[0])
        index = torch.where(local, targets - start, 0)
        target_logit = torch.where(local, logits.gather(1, index[:, None]).squeeze(1), 0.0)
        dist.all_reduce(target_logit, group=group)
        count = valid.sum().clamp(min=1)
        losses = torch.where(valid, torch.log(sum_exp) + global_max - target_logit, 0.0)
        ctx.save_for_backward(hidden, weight_shard, exp, sum_exp, local, index, valid, count)
        ctx.group = group
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight_shard, exp, sum_exp, local, index, valid, count = ctx.saved_tensors
        grad_logits = exp / sum_exp[:, None]
        grad_logits[local, index[local]] -= 1.0
        grad_logits *= (valid[:, None] * grad_loss / count)
        # fp32 here: under autocast the forward matmul ran in bf16, the backward runs without it
        grad_hidden = grad_logits @ weight_shard.float()
        dist.all_reduce(grad_hidden, group=ctx.group)  # each rank saw only its vocabulary slice
        grad_weight = grad_logits.T @ hidden.float()
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight_shard.dtype), None, None, None, None


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: DTensor, targets: torch.Tensor,
                                        ignore_index: int = -100) -> torch.Tensor:
    """`kernels.linear_cross_entropy` for a weight sharded by rows (Shard(0)) over a 1-D TP mesh."""
    if weight.placements != (Shard(0),):
        raise ValueError(f"loss parallelism needs the LM head sharded by vocabulary rows, got {weight.placements}")
    if isinstance(hidden, DTensor):
        hidden = hidden.full_tensor()
    mesh = weight.device_mesh
    rows = weight.shape[0]
    per_rank = -(-rows // mesh.size())  # DTensor's Shard(0): ceil-sized chunks, the last one shorter
    start = min(mesh.get_local_rank() * per_rank, rows)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _VocabParallelCrossEntropy.apply(hidden, weight.to_local(), targets.reshape(-1), ignore_index, start,
                                            mesh.get_group())


def register() -> None:
    """Make this `kernels.linear_cross_entropy`'s implementation for vocabulary-sharded weights; called
    by `parallelize` when it shards the LM head (idempotent)."""
    dispatch.register("linear_cross_entropy", "vocab_parallel", vocab_parallel_linear_cross_entropy)
