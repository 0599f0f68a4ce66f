"""The image-conditioned LM's step on 2 ranks against one process on the same global batch, for
both fusions, under each layout named on the command line.

Usage: torchrun --nproc_per_node 2 tests/vlm_worker.py OUT.pt LAYOUT [LAYOUT ...]
Layouts: "fsdp" (2 FSDP2 ranks, the vision tower frozen: stage "instruct"'s rule), "fsdp_lora" (the
same with LoRA adapters on the LM, its base weights frozen), "tp" (TP=2,
plain), "tp_sp" (TP=2 with sequence and loss parallelism, the defaults), both training every
part, so that the replicated vision tower, projector and cross-attention layers get gradients;
"zero1", "zero2", "zero3" (DeepSpeed, the vision tower frozen). Every row holds the same number of
answer tokens, so the mean of the data-parallel ranks' per-token losses is the one-process loss of
the global batch (the convention every stage's objective shares).
Rank 0 first computes the one-process references; OUT.pt holds, per layout and fusion, what every
rank saw: the loss, the gradients of every trained parameter (gathered from shards and
partitions), the gradient norm and an evaluation loss after one AdamW step; and the references
under "reference".
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tessera.core.config import Config, LoraConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig, VisionConfig, VLMConfig
from tessera.core.engine import LocalEngine
from tessera.core.lora import apply_lora
from tessera.core.optim import build_optimizer
from tessera.distributed.engine import DistributedEngine
from tessera.distributed.env import init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize
from tessera.multimodal.vlm import VLM, set_trainable, vlm_objective

BATCH, SEQ, VOCAB, ANSWER = 6, 14, 23, 4
VISION = VisionConfig(image_size=8, patch_size=4, n_layers=2, n_heads=2, d_model=16)  # 5 tokens
TEXT = ModelConfig(vocab_size=VOCAB, n_layers=3, n_heads=2, d_model=16, max_seq_len=SEQ, bias=True)
OPTIM = OptimConfig(lr=1e-2, eps=1e-6, impl="foreach")
LAYOUTS = {  # name: parallel config fields
    "fsdp": dict(dp_shard=2),
    "fsdp_lora": dict(dp_shard=2),  # LoRA adapters on the LM, its base weights frozen
    "tp": dict(dp_shard=1, tp=2, sequence_parallel=False, loss_parallel=False),
    "tp_sp": dict(dp_shard=1, tp=2, sequence_parallel=True, loss_parallel=True),
    "zero1": dict(engine="deepspeed", zero_stage=1),
    "zero2": dict(engine="deepspeed", zero_stage=2),
    "zero3": dict(engine="deepspeed", zero_stage=3),
}
FROZEN = {"tp": (), "tp_sp": ()}  # the parts each layout freezes (default: the vision tower)
FUSIONS = ("prefix", "cross_attention")


def frozen_parts(layout: str) -> tuple[str, ...]:
    return FROZEN.get(layout, ("vision",))


def variant(layout: str) -> tuple[tuple[str, ...], bool]:
    """What the model of a layout is: (its frozen parts, LoRA on the LM)."""
    return frozen_parts(layout), layout.endswith("_lora")


def global_batch(image_tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    targets = torch.full((BATCH, SEQ), -100)
    for row in range(BATCH):
        start = int(torch.randint(0, 3, (1,), generator=g))
        mask[row, start:start + image_tokens] = True
        end = SEQ - int(torch.randint(0, 2, (1,), generator=g))  # some rows padded
        targets[row, end - 1 - ANSWER:end - 1] = ids[row, end - ANSWER:end]
    return {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=g), "input_ids": ids, "image_mask": mask,
            "targets": targets}


def new_model(fusion: str, frozen: tuple[str, ...], lora: bool = False) -> VLM:
    torch.manual_seed(0)
    model = VLM(VISION, TEXT, VLMConfig(fusion=fusion, cross_every=2))
    for gate in model.cross.parameters():  # open the gates so that the layers matter
        if gate.dim() == 1 and gate.numel() == 1:
            torch.nn.init.constant_(gate, 0.5)
    set_trainable(model, frozen)
    if lora:
        apply_lora(model.lm, LoraConfig(r=2, alpha=4.0))
        for name, p in model.named_parameters():
            if ".lora_b" in name:  # nonzero, so that A gets a gradient too
                torch.nn.init.normal_(p, 0.0, 0.1)
    return model


def full_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole gradient of `p`: a DTensor's gathered, a ZeRO partition's assembled (before the step;
    also tests/clip_worker.py's)."""
    if isinstance(p.grad, DTensor):
        return p.grad.full_tensor()
    if "deepspeed" in sys.modules:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)
    return p.grad


def run(engine, batch: dict) -> dict:
    loss = engine.forward_backward(batch)
    grads = {n: full_grad(p).clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    norm = engine.clip_grad_norm(0.0)
    engine.step()
    engine.zero_grad()
    return {"loss": loss, "grads": grads, "norm": norm, "eval": engine.eval_loss(batch)}


def deepspeed_engine(model: torch.nn.Module, parallel: ParallelConfig, env, batch_size: int, optim: OptimConfig):
    """ZeRO on all ranks, `batch_size` rows per rank, no gradient clipping (also tests/clip_worker.py's)."""
    import deepspeed

    from tessera.distributed.deepspeed_engine import DeepSpeedEngine, deepspeed_config

    cfg = Config(train=TrainConfig(batch_size=batch_size), optim=dataclasses.replace(optim, grad_clip=0.0),
                 parallel=parallel)
    ds, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, optim, env.device),
                                  config=deepspeed_config(cfg, env.world_size))
    return DeepSpeedEngine(ds, env.device, "fp32")


def train(layout: str, fusion: str, env) -> dict:
    parallel = ParallelConfig(**LAYOUTS[layout])
    model = new_model(fusion, *variant(layout))
    batch = global_batch(model.image_tokens)
    if parallel.engine == "deepspeed":
        engine = deepspeed_engine(model, parallel, env, BATCH // env.world_size, OPTIM)
        dp_rank, dp_size = env.rank, env.world_size
    else:
        dims = ParallelDims.resolve(parallel, env.world_size)
        parallelize(model, parallel, dims, dims.build_mesh("cpu"))
        engine = DistributedEngine(model, build_optimizer(model, OPTIM, env.device), env.device)
        dp_rank, dp_size = dims.dp_rank(env.rank), dims.dp_size
    engine.objective = vlm_objective
    per_rank = BATCH // dp_size
    result = run(engine, {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()})
    if parallel.engine == "deepspeed":
        engine.close()
    return result


def main() -> None:
    out_path, layouts = sys.argv[1], sys.argv[2:]
    env = init_distributed("cpu")
    out: dict = {"reference": {}}
    if env.rank == 0:  # first: ZeRO-3 patches torch functions for the rest of the process
        one = dataclasses.replace(env, world_size=1)
        for frozen, lora in {variant(layout) for layout in layouts}:
            for fusion in FUSIONS:
                model = new_model(fusion, frozen, lora)
                engine = LocalEngine(model, build_optimizer(model, OPTIM, one.device), one.device,
                                     objective=vlm_objective)
                out["reference"][fusion, frozen, lora] = run(engine, global_batch(model.image_tokens))
    for layout in layouts:  # DeepSpeed's last, when asked for
        for fusion in FUSIONS:
            ranks = [None] * env.world_size
            dist.all_gather_object(ranks, train(layout, fusion, env))
            out.setdefault(layout, {})[fusion] = ranks
    if env.rank == 0:
        torch.save(out, out_path)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed_worker.py: skip the teardown where gloo may abort
