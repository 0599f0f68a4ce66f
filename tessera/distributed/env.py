"""Who this process is in the job: rank, world size, device and the process group.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` without torchrun sets SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID but not the rendezvous address, which the launcher must export.
Anything else is a single process and gets no process group, so the same training code runs
unchanged from a laptop to a cluster. The launcher's `job.dist_timeout_s` arrives as
TESSERA_DIST_TIMEOUT_S, the collective timeout (torch's default: 10 minutes).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed(device_type: str = "auto") -> DistributedEnv:
    """Join the process group once (nccl on CUDA, gloo on CPU); later calls return the same env."""
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
        timeout = int(os.environ.get("TESSERA_DIST_TIMEOUT_S", "0") or 0)
        # device_id binds the NCCL communicator to this rank's GPU at once (eager init, no guessing)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout) if timeout > 0 else None,
                                device_id=device if device_type == "cuda" else None)
    return DistributedEnv(rank, local_rank, world, device, dist.get_backend())


def destroy() -> None:
    """Leave the process group, if any (safe to call twice or without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
