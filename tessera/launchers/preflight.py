"""Before a job waits in a queue: run the recipe's checks on this node and size its preemption lead.

`check` runs `python -m tessera.distributed.preflight` (config, data, tokenizer, the planner's fit
on `job.gpu`) and returns the planner's figures; a failed check is a ConfigError with the check's
own one-line message. `resolve` turns `job.signal = "SIG@auto"` into seconds: a preempted run must
finish its step and write a full checkpoint (parameters and AdamW state, `ckpt_bytes`) at
`job.ckpt_write_gbps` before SLURM's time limit, so the lead is

    60 s (signal delivery, teardown) + one step + 1.25 x checkpoint bytes / write bandwidth,

rounded up to 10 s and never under 90 s (e.g. Llama 70B: 0.85 TB at 5 GB/s, about 300 s).
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass

from tessera.core.config import ConfigError
from tessera.launchers.config import LaunchConfig

MIN_LEAD_S = 90
MARGIN_S = 60
WRITE_SLACK = 1.25


@dataclass(frozen=True)
class Figures:
    ckpt_bytes: int = 0
    step_s: float = 0.0  # 0 when job.gpu is not set
    peak_gib: float = 0.0
    mem_gib: float = 0.0


def command(cfg: LaunchConfig, data: bool = True) -> list[str]:
    job = cfg.job
    args = {"command": cfg.recipe.command, "config": cfg.recipe.path, "overrides": cfg.train_overrides(),
            "world": job.world_size, "gpus_per_node": job.procs_per_node, "gpu": job.gpu, "data": data}
    return [sys.executable, "-m", "tessera.distributed.preflight", json.dumps(args)]


def check(cfg: LaunchConfig, data: bool = True) -> Figures:
    """The recipe's checks (`data`: also its data and tokenizer) and the planner's figures."""
    proc = subprocess.run(command(cfg, data), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ConfigError(f"pre-launch check of {cfg.recipe.path}: {lines[-1].removeprefix('tessera: error: ')}")
    return Figures(**json.loads(proc.stdout.strip().splitlines()[-1]))


def write_s(cfg: LaunchConfig, figures: Figures) -> float:
    return figures.ckpt_bytes / (cfg.job.ckpt_write_gbps * 1e9)


def lead_seconds(cfg: LaunchConfig, figures: Figures) -> int:
    need = MARGIN_S + figures.step_s + WRITE_SLACK * write_s(cfg, figures)
    return max(MIN_LEAD_S, 10 * math.ceil(need / 10))


def resolve(cfg: LaunchConfig, figures: Figures) -> LaunchConfig:
    """`cfg` with `SIG@auto` replaced by the lead time in seconds."""
    job = cfg.job
    if not job.signal.endswith("@auto"):
        return cfg
    signal = job.signal.replace("@auto", f"@{lead_seconds(cfg, figures)}")
    return dataclasses.replace(cfg, job=dataclasses.replace(job, signal=signal))


def needs_figures(cfg: LaunchConfig) -> bool:
    return cfg.job.backend in ("slurm", "submitit")


def advice(cfg: LaunchConfig, figures: Figures) -> str:
    """What to tell the user about preemption by scancel, which gives KillWait, not the lead time."""
    need = math.ceil(MARGIN_S + figures.step_s + WRITE_SLACK * write_s(cfg, figures))
    return (f"checkpoint {figures.ckpt_bytes / 1e9:,.1f} GB at {cfg.job.ckpt_write_gbps:g} GB/s: about "
            f"{write_s(cfg, figures):,.0f} s to write; preempting with plain scancel leaves only the cluster's KillWait "
            f"between SIGTERM and SIGKILL, so ask for KillWait >= {need} s or preempt with "
            f"`scancel --batch --signal={cfg.job.signal.removeprefix('B:').split('@')[0]} JOB`")
