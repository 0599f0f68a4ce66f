"""Sharded checkpoints across layouts, inside torchrun launches (tests/test_distributed.py).

Usage: torchrun --nproc_per_node N tests/dcp_worker.py save|load DIR
  save (2 ranks): rank 0 trains the uninterrupted single-process reference (6 steps); FSDP over 2
      trains 3 steps and saves DIR/<style>/step_000003; then a TP=2 model loads it and trains 3 more.
  load (N ranks): FSDP over N loads DIR/<style>/step_000003 and trains 3 more.
Rank 0 writes DIR/<mode><N>.json; `resume_single_process` is the 1-rank case, run in the test itself.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from distributed_worker import GRAD_CLIP, MODELS, OPTIM, global_batch
from tessera.core.config import ParallelConfig
from tessera.core.engine import LocalEngine
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer
from tessera.distributed.checkpoint import load_sharded, save_sharded
from tessera.distributed.engine import DistributedEngine
from tessera.distributed.env import destroy, exit_process, init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize

STYLES = ("llama", "gpt2")  # the styles whose sharded checkpoints are tested

HALF = 3  # steps before the checkpoint, and after it


def build(style: str, parallel: ParallelConfig | None, env):
    """A freshly initialised engine and this rank's slice of the global batch."""
    torch.manual_seed(1234)
    model = Transformer(MODELS[style])
    x, y = global_batch()
    if parallel is None:
        return LocalEngine(model, build_optimizer(model, OPTIM, env.device), env.device), x, y
    dims = ParallelDims.resolve(parallel, env.world_size)
    parallelize(model, parallel, dims, dims.build_mesh(env.device.type))
    engine = DistributedEngine(model, build_optimizer(model, OPTIM, env.device), env.device)
    n, r = x.shape[0] // dims.dp_size, dims.dp_rank(env.rank)
    return engine, x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]


def train(engine, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(engine.forward_backward((x, y)).item())
        engine.clip_grad_norm(GRAD_CLIP)
        engine.step()
        engine.zero_grad()
    return losses


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    out = model(global_batch()[0])
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return out


def resume_single_process(ckpt: Path, style: str) -> tuple[list[float], dict | None]:
    """The 1-rank case: a plain model and LocalEngine, no process group."""
    env = init_distributed("cpu")
    engine, x, y = build(style, None, env)
    extra = load_sharded(ckpt, engine.model, engine.optimizer)
    return train(engine, x, y, HALF), extra


def save_mode(root: Path, env) -> dict:
    results = {}
    for style in STYLES:
        r = results[style] = {}
        if env.rank == 0:
            ref, x, y = build(style, None, dataclasses.replace(env, world_size=1))
            r["reference"] = train(ref, x, y, 2 * HALF)
        engine, x, y = build(style, ParallelConfig(dp_shard=2), env)
        r["before"] = train(engine, x, y, HALF)
        extra = {"loader": {"epoch": 0, "batch": HALF, "rank": env.rank}, "rng": torch.get_rng_state()}
        ckpt = save_sharded(root / style, HALF, engine.model, engine.optimizer, extra)
        trained_logits = logits(engine.model)
        if env.rank == 0:
            torch.save(trained_logits, root / f"{style}_logits.pt")
        tp, x, y = build(style, ParallelConfig(dp_shard=1, tp=2, sequence_parallel=False), env)
        got = load_sharded(ckpt, tp.model, tp.optimizer)
        r["tp_extra_ok"] = got is not None and got["loader"] == extra["loader"] and torch.equal(got["rng"], extra["rng"])
        r["tp"] = train(tp, x, y, HALF)
    return results


def load_mode(root: Path, env) -> dict:
    results = {}
    for style in STYLES:
        engine, x, y = build(style, ParallelConfig(dp_shard=env.world_size), env)
        extra = load_sharded(root / style / f"step_{HALF:06d}", engine.model, engine.optimizer)
        results[style] = {"fsdp": train(engine, x, y, HALF), "extra_is_none": extra is None}
    return results


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    env = init_distributed("cpu")
    results = (save_mode if mode == "save" else load_mode)(root, env)
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, results)
    if env.rank == 0:
        (root / f"{mode}{env.world_size}.json").write_text(json.dumps(gathered))
    destroy()


if __name__ == "__main__":
    main()
    exit_process(0)  # as `tessera train` ends: exit handlers run, no interpreter teardown (see env.py)
