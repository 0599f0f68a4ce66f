"""Who this process is in the job: rank, world size, device and the process group.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` without torchrun sets SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID but not the rendezvous address, which the launcher must export.
Anything else is a single process and gets no process group, so the same training code runs
unchanged from a laptop to a cluster.

Joining the group, and every collective after, waits at most TESSERA_DIST_TIMEOUT_S seconds
(default 300, not torch's 10 to 30 minutes; the launcher's `job.dist_timeout_s` sets it): a
restarted torchrun group that fails to re-form ends in one line soon, rather than hang.

Leaving: `destroy()` first drops what torch's DTensor caches keep of the meshes (sharding
propagation and redistribution plans hold every mesh, and a mesh holds its groups, after the
model is gone), then the groups. Even so torch 2.13 keeps a gloo group referenced from C++
after FSDP2's `fully_shard` (its worker threads measured alive after `destroy_process_group`),
and tearing such threads down with the interpreter is what aborted a rank now and then at exit
("terminate called without an active exception", exit -6). So `exit_process` ends a process
that joined a group with the exit handlers run and the interpreter's teardown skipped.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


DEFAULT_TIMEOUT_S = 300.0
_joined = False  # whether this process ever joined a process group


class DistributedTimeout(TimeoutError):
    """The process group did not form in time (a rank missing, a wrong MASTER_ADDR/PORT)."""


def group_timeout(seconds: float | None = None) -> timedelta:
    """`seconds`, else TESSERA_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S; a value that is no positive number is an error."""
    raw = os.environ.get("TESSERA_DIST_TIMEOUT_S", "") if seconds is None else seconds
    try:
        value = float(raw) if raw != "" else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"TESSERA_DIST_TIMEOUT_S={raw!r} must be a positive number of seconds")
    return timedelta(seconds=value)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group


def _ranks_from_environment() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun, else SLURM, else None (single process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"launched by SLURM without torchrun but {', '.join(missing)} is not set: "
                               "export MASTER_ADDR (the first node of the job) and MASTER_PORT before srun")
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        return rank, int(os.environ["LOCAL_RANK"]), world
    return None


def init_distributed(device_type: str = "auto", timeout_s: float | None = None) -> DistributedEnv:
    """Join the process group once (nccl on CUDA, gloo on CPU); later calls return the same env.
    `timeout_s` bounds joining and each collective (default: see `group_timeout`)."""
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = _ranks_from_environment()
    if ranks is None:
        return DistributedEnv(0, 0, 1, torch.device(device_type), None)
    rank, local_rank, world = ranks
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        global _joined
        _joined = True
        timeout = group_timeout(timeout_s)
        try:  # device_id binds the NCCL communicator to this rank's GPU at once (eager init, no guessing)
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if device_type == "cuda" else None)
        except (dist.DistStoreError, dist.DistNetworkError) as e:  # the master waited, or a rank never reached it
            raise DistributedTimeout(f"rank {rank} of {world}: the process group did not form within "
                                     f"{timeout.total_seconds():g} s ({str(e).splitlines()[0]}); check that every "
                                     "rank started and MASTER_ADDR/MASTER_PORT, or raise TESSERA_DIST_TIMEOUT_S") from None
    return DistributedEnv(rank, local_rank, world, device, dist.get_backend())


def _drop_dtensor_caches() -> None:
    """Empty the caches through which DTensor keeps every mesh (and so its groups) alive. They are
    torch's private names: a torch without one only keeps the meshes longer (a test says so)."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._collective_utils import MeshTopoInfo
        from torch.distributed.tensor._redistribute import _gen_transform_infos

        propagator = DTensor._op_dispatcher.sharding_propagator
        propagator.propagate_op_sharding.cache_clear()
        propagator._propagate_tensor_meta_cached.cache_clear()
        torch._C._clear_DTensor_sharding_propagator_cache()
        _gen_transform_infos.cache_clear()
        MeshTopoInfo.build_from_mesh.cache_clear()
    except (ImportError, AttributeError):
        pass


def destroy() -> None:
    """Leave the process group, if any (safe to call twice or without one); DeepSpeed's own
    references to the groups are released with them, through its API, when it is in use."""
    if dist.is_available() and dist.is_initialized():
        _drop_dtensor_caches()
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End the process with `status`. One that joined a process group runs its exit handlers
    (engines closed, logs and writers flushed) and joins its threads while the interpreter is
    whole, then skips the teardown where leftover gloo threads aborted it (see the module's doc)."""
    if not _joined:
        sys.exit(status)
    destroy()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
