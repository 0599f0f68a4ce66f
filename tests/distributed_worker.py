"""Trains a tiny model under several parallel layouts inside one torchrun launch.

Usage: torchrun --nproc_per_node N tests/distributed_worker.py OUT.json LAYOUT [LAYOUT ...]
Each layout trains the model styles for STEPS steps on the same global batch (each data-parallel
rank takes its slice); rank 0 also trains the single-process reference and writes everything to
OUT.json for tests/test_distributed.py to compare.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tessera.core.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from tessera.core.engine import LocalEngine
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer
from tessera.distributed.engine import DistributedEngine
from tessera.distributed.env import destroy, exit_process, init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize

STEPS, BATCH, SEQ, GRAD_CLIP = 6, 4, 16, 0.5
BASE = dict(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)
MODELS = {
    "llama": ModelConfig(**BASE, norm="rmsnorm", pos="rope", mlp="swiglu", d_ff=64),
    "gpt2": ModelConfig(**BASE, norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=False),
    # Qwen2/Mistral knobs under tensor parallelism: heads of their own width, q/k/v biases, a window from layer 1
    "qwen2": ModelConfig(**BASE, norm="rmsnorm", pos="rope", mlp="swiglu", d_ff=64, qkv_bias=True, attn_head_dim=12,
                         sliding_window=5, window_from_layer=1, rope_scaling="yarn", rope_factor=2.0,
                         rope_original_max_seq_len=8),
}
STYLE_LAYOUTS = {"qwen2": ("tp_sp", "fsdp_tp")}  # the layouts a style runs under (default: all)
LAYOUTS = {  # name: parallel config fields
    "ddp": dict(dp_replicate=2, dp_shard=1),
    "fsdp": dict(dp_shard=2),
    "tp": dict(dp_shard=1, tp=2, sequence_parallel=False, loss_parallel=False),
    "tp_sp": dict(dp_shard=1, tp=2, sequence_parallel=True, loss_parallel=False),
    "tp_sp_lp": dict(dp_shard=1, tp=2, sequence_parallel=True, loss_parallel=True),
    "fsdp_ac": dict(dp_shard=2, activation_checkpoint="op"),
    "fsdp_bf16": dict(dp_shard=2, mixed_precision="bf16", reshard_after_forward=False,
                      activation_checkpoint="full"),
    "hsdp": dict(dp_replicate=2, dp_shard=2),
    "fsdp_tp": dict(dp_shard=2, tp=2, sequence_parallel=True, loss_parallel=True),
    "zero1": dict(engine="deepspeed", zero_stage=1),
    "zero2": dict(engine="deepspeed", zero_stage=2),
    "zero3": dict(engine="deepspeed", zero_stage=3),
}
# eps 1e-6: the key bias has a zero true gradient (softmax ignores it), and with a tiny eps AdamW
# would turn its rounding noise into full-size updates that make layouts drift apart.
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, eps=1e-6, impl="foreach")


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_numel(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).numel()


def train(model_cfg: ModelConfig, parallel: ParallelConfig | None, env) -> dict:
    torch.manual_seed(1234)
    model = Transformer(model_cfg)
    x, y = global_batch()
    gather = contextlib.nullcontext
    if parallel is None:
        engine = LocalEngine(model, build_optimizer(model, OPTIM, env.device), env.device)
    elif parallel.engine == "deepspeed":
        engine, gather = deepspeed_engine(model, parallel, env)
        per_rank = BATCH // env.world_size
        x, y = x[env.rank * per_rank:(env.rank + 1) * per_rank], y[env.rank * per_rank:(env.rank + 1) * per_rank]
    else:
        dims = ParallelDims.resolve(parallel, env.world_size)
        mesh = dims.build_mesh(env.device.type)
        frozen = copy.deepcopy(model).requires_grad_(False)  # a second model on the same mesh (alignment)
        parallelize(model, parallel, dims, mesh)
        parallelize(frozen, parallel, dims, mesh)
        engine = DistributedEngine(model, build_optimizer(model, OPTIM, env.device), env.device)
        per_rank = BATCH // dims.dp_size
        rank = dims.dp_rank(env.rank)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    losses, norms = [], []
    for _ in range(STEPS):
        losses.append(engine.forward_backward((x, y)).item())
        norms.append(engine.clip_grad_norm(GRAD_CLIP).item())
        engine.step()
        engine.zero_grad()
    with gather():
        params = {n: full(p.detach()).clone() for n, p in model.state_dict().items()}  # keys without AC wrappers
    state = [s["exp_avg"] for s in engine.optimizer.state.values()]
    frozen_loss = None
    if parallel is not None and parallel.engine != "deepspeed":
        frozen_loss = DistributedEngine(frozen, torch.optim.SGD([torch.zeros(1)]), env.device).eval_loss((x, y)).item()
    return {
        "losses": losses, "norms": norms, "eval": engine.eval_loss((x, y)).item(), "frozen_eval": frozen_loss,
        "checksums": {n: [p.double().sum().item(), p.double().abs().sum().item()] for n, p in params.items()},
        "param_numel": sum(full(p.detach()).numel() for p in model.parameters()),
        "local_param_numel": sum(local_numel(p) for p in model.parameters()),
        "state_numel": sum(full(s).numel() for s in state),
        "local_state_numel": sum(local_numel(s) for s in state),
    }


def deepspeed_engine(model: Transformer, parallel: ParallelConfig, env):
    """ZeRO on all ranks, and a context that gathers ZeRO-3's partitioned parameters for reading."""
    import deepspeed

    from tessera.distributed.deepspeed_engine import DeepSpeedEngine, deepspeed_config

    cfg = Config(train=TrainConfig(batch_size=BATCH // env.world_size), optim=dataclasses.replace(OPTIM, grad_clip=GRAD_CLIP),
                 parallel=parallel)
    ds, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OPTIM, env.device),
                                  config=deepspeed_config(cfg, env.world_size))
    params = list(model.parameters())
    return DeepSpeedEngine(ds, env.device, "fp32"), lambda: deepspeed.zero.GatheredParameters(params)


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    env = init_distributed("cpu")
    results: dict = {"world_size": env.world_size, "layouts": {}}
    for style, model_cfg in MODELS.items():
        if env.rank == 0:
            results.setdefault("reference", {})[style] = train(model_cfg, None, dataclasses.replace(env, world_size=1))
    # Layout-major, DeepSpeed last: ZeRO-3 patches torch functions for the rest of the process.
    for name in names:
        for style, model_cfg in MODELS.items():
            if name not in STYLE_LAYOUTS.get(style, (name,)):
                continue
            r = train(model_cfg, ParallelConfig(**LAYOUTS[name]), env)
            gathered = [None] * env.world_size
            dist.all_gather_object(gathered, {k: r[k] for k in ("local_param_numel", "local_state_numel")})
            r["per_rank"] = gathered
            results["layouts"].setdefault(name, {})[style] = r
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    destroy()


if __name__ == "__main__":
    main()
    exit_process(0)  # as `tessera train` ends: exit handlers run, no interpreter teardown (see env.py)
