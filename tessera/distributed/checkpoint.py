"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards.

    <dir>/step_000500/.metadata, __R_0.distcp   model + optimizer, by parameter name and global offset
                     /rank{R}.pt                 per-rank extras (data-loader state, RNG), torch.save
                     /<companion>/.metadata, ...  a second trained model (PPO's value model), DCP too

DCP stores each shard with its place in the global tensor, so a checkpoint saved under one layout
(FSDP over 2 ranks) loads into another (FSDP over 4, TP, or a plain single-process model).
Optimizer state is saved flattened (keyed by parameter name, not by param-group index), because
DistributedEngine splits param groups by tensor kind and the group count differs across layouts.

Data-loader state is per rank and only restorable at the same world size: at another one
`load_sharded` restores model and optimizer and returns None for the extras, and the caller
decides (the loader refuses a different layout anyway, since its order could not be reproduced).

Directories follow the local Checkpointer: written to `.step_NNNNNN.tmp` and, after a barrier,
renamed by rank 0, so a crash never leaves a half-written `step_NNNNNN`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tessera.core.checkpoint import Checkpointer, companion_dir, publish, write_run_files
from tessera.core.config import ModelConfig, to_dict
from tessera.core.model import Transformer

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns whenever it runs without a process group; here that is the 1-rank case, on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _start_sharded_save(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict, run_files=None, async_group=None):
    """Collective: the temporary directory with every rank's `extra` and rank 0's `run_files(tmp)`;
    the DCP shards written now, or in the background on `async_group` (the returned future)."""
    tmp = directory / f".step_{step:06d}.tmp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if run_files is not None:
            run_files(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    future = None
    with _single_process_is_intended():
        state = {"model": model_sd, "optim": optim_sd}
        if async_group is not None:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=async_group)
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
    with open(tmp / f"rank{rank}.pt", "wb") as f:
        torch.save(extra, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp, future


def _publish_when_all_done(tmp: Path, final: Path) -> None:
    _barrier()
    if _rank() == 0:
        publish(tmp, final)
    _barrier()


def save_sharded(directory: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict, run_files=None) -> Path:
    """Collective: every rank writes its shards and `extra` into the temporary directory, rank 0
    adds `run_files(tmp)` (config, tokenizer), then renames it once all ranks are done."""
    directory = Path(directory)
    final = directory / f"step_{step:06d}"
    tmp, _ = _start_sharded_save(directory, step, model, optimizer, extra, run_files)
    _publish_when_all_done(tmp, final)
    return final


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Collective: load model and optimizer state into any layout (resharding as needed); return this
    rank's extras when the checkpoint was saved at this world size, else None."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIONS)
    saved_world = len(list(path.glob("rank*.pt")))
    if saved_world != _world_size():
        return None
    return torch.load(path / f"rank{_rank()}.pt", weights_only=True)


class ShardedCheckpointer(Checkpointer):
    """The trainer's checkpointer for DDP/FSDP/TP runs: DCP shards plus each rank's trainer state.

    One process writes the plain single-process format and reads both, so a run sharded over
    many ranks can be continued on one. A checkpoint saved at another world size restores model
    and optimizer and returns the first rank's state without its RNG; the trainer sees from the
    loader state that the data order cannot be replayed.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2, attachments: tuple[Path, ...] = (),
                 async_save: bool = False):
        """`async_save`: shards are staged in memory and written by a background thread on a process
        group of their own; the step directory is renamed into place when the next save (or `wait`)
        finds them written, so training continues meanwhile and a crash still leaves only complete ones."""
        super().__init__(directory, keep_last, attachments)
        self._async_group = dist.new_group(backend="gloo") if async_save and _world_size() > 1 else None
        self._pending: tuple | None = None

    def save(self, step: int, engine, state: dict, run_config: str = "", companions: dict | None = None) -> Path:
        if not _distributed() or _world_size() == 1:
            return super().save(step, engine, state, run_config, companions)
        self.wait()

        def run_files(tmp: Path) -> None:
            write_run_files(tmp, engine.model.cfg, run_config, self.attachments)

        final = self.directory / f"step_{step:06d}"
        tmp, future = _start_sharded_save(self.directory, step, engine.model, engine.optimizer, state, run_files,
                                          self._async_group)
        for name, companion in (companions or {}).items():
            model_sd, optim_sd = get_state_dict(companion.model, companion.optimizer, options=OPTIONS)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / name))
        self._pending = (future, tmp, final)
        if future is None:
            self.wait()
        return final

    def wait(self) -> None:
        """Collective: finish the save in flight, if any, and rename it into place."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        if future is not None:
            future.result()
        _publish_when_all_done(tmp, final)
        if _rank() == 0:
            self.prune()
        _barrier()

    def load(self, path: str | Path, engine, companions: dict | None = None) -> dict:
        path = Path(path)
        if not (path / ".metadata").exists():
            if _world_size() == 1:
                return super().load(path, engine, companions)
            raise ValueError(f"{path} is a single-process checkpoint; continue it with one process, or start "
                             "a sharded run from its weights (model.init_from)")
        directories = {name: companion_dir(path, name) for name in companions or {}}
        for name, directory in directories.items():
            load_sharded(directory, companions[name].model, companions[name].optimizer)
        state = load_sharded(path, engine.model, engine.optimizer)
        if state is not None:
            return state
        first = torch.load(path / "rank0.pt", weights_only=True)
        return {k: v for k, v in first.items() if k != "rng"}  # the loader state tells it cannot be replayed


def export_consolidated(path: str | Path, model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Gather a sharded checkpoint's weights into one process (no process group needed) and write
    `model.safetensors` + `config.json`, the layout `load_model_from_checkpoint` and `generate` read."""
    model = Transformer(model_cfg)
    state = {"model": get_model_state_dict(model)}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)  # only the model keys are read
    model.load_state_dict(state["model"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(to_dict(model_cfg), indent=2))
    return out_dir
