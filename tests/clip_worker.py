"""CLIP's contrastive step on 2 ranks against one process on the same global batch.

Usage: torchrun --nproc_per_node 2 tests/clip_worker.py OUT.pt [LAYOUT ...]
Layouts: "fsdp" (2 FSDP2 ranks, the default), "zero2", "zero3" (DeepSpeed).
Rank 0 then computes the one-process reference; OUT.pt holds the losses, the gradients of every
parameter (gathered from shards and partitions) and the evaluation metrics of each layout and of
the reference, for tests/test_clip.py.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from vlm_worker import deepspeed_engine, full_grad

from tessera.core.config import ClipConfig, ModelConfig, OptimConfig, ParallelConfig, VisionConfig
from tessera.core.engine import LocalEngine
from tessera.core.optim import build_optimizer
from tessera.distributed.engine import DistributedEngine
from tessera.distributed.env import destroy, init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize
from tessera.multimodal.clip import CLIP, clip_objective

BATCH, SEQ, VOCAB = 6, 8, 23
VISION = VisionConfig(image_size=8, patch_size=4, n_layers=2, n_heads=2, d_model=16)
TEXT = ModelConfig(vocab_size=VOCAB, n_layers=2, n_heads=2, d_model=16, max_seq_len=SEQ, bias=True)
OPTIM = OptimConfig(lr=1e-2, eps=1e-6, impl="foreach")
LAYOUTS = {"fsdp": dict(dp_shard=2), "zero2": dict(engine="deepspeed", zero_stage=2),
           "zero3": dict(engine="deepspeed", zero_stage=3)}


def global_batch() -> dict[str, torch.Tensor]:
    """Six pairs (two share a caption) with two hard negatives each, some of them another row's
    caption (a right answer there); a caption id stands for one token row, as a caption's hash does."""
    g = torch.Generator().manual_seed(0)
    texts, text_lengths = torch.randint(0, VOCAB, (12, SEQ), generator=g), torch.randint(1, SEQ + 1, (12,), generator=g)
    captions, negatives = torch.tensor([0, 1, 2, 2, 3, 4]), torch.tensor([5, 2, 6, 0, 7, 8, 1, 9, 10, 3, 11, 4])
    return {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=g),
            "input_ids": texts[captions], "lengths": text_lengths[captions], "caption_ids": captions,
            "labels": torch.tensor([0, 2, 1, 1, 0, 2]),
            "class_ids": torch.randint(0, VOCAB, (3, SEQ), generator=g), "class_lengths": torch.tensor([2, 5, 8]),
            "negative_input_ids": texts[negatives], "negative_lengths": text_lengths[negatives],
            "negative_caption_ids": negatives}


def rank_rows(batch: dict, rank: int, ranks: int) -> dict:
    """A rank's share: its rows and their negatives; every rank has all the class prompts."""
    def share(v: torch.Tensor) -> torch.Tensor:
        n = v.shape[0] // ranks
        return v[rank * n:(rank + 1) * n]
    return {k: v if k.startswith("class_") else share(v) for k, v in batch.items()}


def run(engine, batch: dict) -> dict:
    """Loss and gradients of a first step, then the loss and metrics of an evaluation after it."""
    loss = engine.forward_backward(batch)
    grads = {n: full_grad(p).clone() for n, p in engine.model.named_parameters()}
    engine.clip_grad_norm(0.0)
    engine.step()
    engine.zero_grad()
    return {"loss": loss, "grads": grads, "eval": engine.eval_loss(batch), "metrics": dict(engine.metrics)}


def main() -> None:
    out_path, layouts = sys.argv[1], sys.argv[2:] or ["fsdp"]
    env = init_distributed("cpu")
    torch.manual_seed(0)
    reference = CLIP(VISION, TEXT, ClipConfig(embed_dim=8))
    batch = global_batch()
    out = {}
    per_rank = BATCH // env.world_size
    for layout in layouts:
        model = copy.deepcopy(reference)
        parallel = ParallelConfig(**LAYOUTS[layout])
        if parallel.engine == "deepspeed":
            engine = deepspeed_engine(model, parallel, env, per_rank, OPTIM)
        else:
            dims = ParallelDims.resolve(parallel, env.world_size)
            parallelize(model, parallel, dims, dims.build_mesh("cpu"))
            engine = DistributedEngine(model, build_optimizer(model, OPTIM, env.device), env.device)
        engine.objective = clip_objective
        out[layout] = run(engine, rank_rows(batch, env.rank, env.world_size))
        if parallel.engine == "deepspeed":
            engine.close()
    destroy()
    if env.rank == 0:  # after the group is gone: one process, no gathering
        out["reference"] = run(LocalEngine(reference, build_optimizer(reference, OPTIM, env.device), env.device,
                                           objective=clip_objective), batch)
        torch.save(out, out_path)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed_worker.py: skip the teardown where gloo may abort
