"""The image-conditioned LM's step on 2 FSDP2 ranks against one process on the same global batch,
for both fusions, with the vision tower frozen (stage "instruct"'s rule), and for cross-attention
with LoRA adapters on the LM (its base weights frozen, the adapters' B nonzero so that A learns too).

Usage: torchrun --nproc_per_node 2 tests/vlm_worker.py OUT.pt
Every row holds the same number of answer tokens, so the mean of the ranks' per-token losses is
the one-process loss of the global batch (the convention every stage's objective shares).
Rank 0 then computes the one-process reference; OUT.pt holds both losses, the gradients of every
trained parameter (gathered from the shards) and an evaluation loss after one AdamW step.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from tessera.core.config import LoraConfig, ModelConfig, OptimConfig, ParallelConfig, VisionConfig, VLMConfig
from tessera.core.engine import LocalEngine
from tessera.core.lora import apply_lora
from tessera.core.optim import build_optimizer
from tessera.distributed.engine import DistributedEngine
from tessera.distributed.env import destroy, init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize
from tessera.multimodal.vlm import VLM, set_trainable, vlm_objective

BATCH, SEQ, VOCAB, ANSWER = 6, 14, 23, 4
VISION = VisionConfig(image_size=8, patch_size=4, n_layers=2, n_heads=2, d_model=16)  # 5 tokens
TEXT = ModelConfig(vocab_size=VOCAB, n_layers=3, n_heads=2, d_model=16, max_seq_len=SEQ, bias=True)
OPTIM = OptimConfig(lr=1e-2, eps=1e-6, impl="foreach")


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


def run(engine, batch: dict) -> dict:
    loss = engine.forward_backward(batch)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in engine.model.named_parameters() if p.grad is not None}
    engine.clip_grad_norm(0.0)
    engine.step()
    engine.zero_grad()
    return {"loss": loss, "grads": grads, "eval": engine.eval_loss(batch)}


def main() -> None:
    env = init_distributed("cpu")
    out = {}
    parallel = ParallelConfig(dp_shard=2)
    dims = ParallelDims.resolve(parallel, env.world_size)
    mesh = dims.build_mesh("cpu")
    references = {}
    for case in ("prefix", "cross_attention", "cross_attention_lora"):
        torch.manual_seed(0)
        model = VLM(VISION, TEXT, VLMConfig(fusion=case.removesuffix("_lora"), cross_every=2))
        for gate in model.cross.parameters():  # open the gates so that the layers matter
            if gate.dim() == 1 and gate.numel() == 1:
                torch.nn.init.constant_(gate, 0.5)
        set_trainable(model, ("vision",))
        if case.endswith("_lora"):
            apply_lora(model.lm, LoraConfig(r=2, alpha=4.0))
            for name, p in model.named_parameters():
                if ".lora_b" in name:
                    torch.nn.init.normal_(p, 0.0, 0.1)
        references[case] = copy.deepcopy(model)
        batch = global_batch(model.image_tokens)
        parallelize(model, parallel, dims, mesh)
        engine = DistributedEngine(model, build_optimizer(model, OPTIM, env.device), env.device)
        engine.objective = vlm_objective
        per_rank = BATCH // env.world_size
        rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
        out[case] = {"fsdp": run(engine, {k: v[rows] for k, v in batch.items()}), "batch": batch}
    destroy()
    if env.rank == 0:  # after the group is gone: one process, no gathering
        for case, reference in references.items():
            engine = LocalEngine(reference, build_optimizer(reference, OPTIM, env.device), env.device,
                                 objective=vlm_objective)
            out[case]["reference"] = run(engine, out[case].pop("batch"))
        torch.save(out, sys.argv[1])


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed_worker.py: skip the teardown where gloo may abort
