"""SLURM through submitit: one submitit task per training process.

Each task exports the torch distributed variables with submitit's `TorchDistributedEnvironment`
and runs `python -m tessera train` as a child process, so nothing of the training code is
pickled or imported here. On SLURM's preemption signal the child (which receives it too)
checkpoints and exits, and `checkpoint()` hands submitit a fresh task to requeue, which resumes
with `--checkpoint.resume=auto`. submitit is optional: `pip install tessera[launch]`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tessera.core.config import ConfigError
from tessera.launchers import torchrun
from tessera.launchers.config import LaunchConfig


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("job.backend='submitit' needs the submitit package: pip install 'tessera[launch]'") from None
    return submitit


def minutes(time_limit: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) as whole minutes, rounded up."""
    days, _, rest = time_limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, mins, secs = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + mins + (secs > 0)
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + (parts[2] > 0)
    return parts[0] + (len(parts) == 2 and parts[1] > 0)


class TrainTask:
    """The callable submitit runs in every task: `tessera train` in a child process."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, env
        self.proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env})
        rc = self.proc.wait()
        if rc != 0:
            raise RuntimeError(f"{' '.join(self.argv)} exited with status {rc}")
        return rc

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook: let the child finish its checkpoint, then requeue."""
        if self.proc is not None:
            self.proc.wait()
        return _submitit().helpers.DelayedSubmission(TrainTask(self.argv, self.env))

    def __getstate__(self) -> dict:
        return {"argv": self.argv, "env": self.env, "proc": None}


def parameters(cfg: LaunchConfig) -> dict:
    """submitit's AutoExecutor parameters for `cfg` (one task per process)."""
    job = cfg.job
    if not job.time:
        raise ConfigError("job.time is required with job.backend='submitit' (submitit's default is 5 minutes)")
    env = [(k, v) for k, v in torchrun.environment(cfg) if k not in (torchrun.PREFIX_ENV[0], "PYTHONUNBUFFERED")]
    setup = ["set +u", *job.setup, "set -u"] if job.setup else []
    params = {"name": job.name, "nodes": job.nodes, "tasks_per_node": job.procs_per_node,
              "timeout_min": minutes(job.time), "slurm_setup": [f"export {k}={torchrun.shell_line([v])}" for k, v in env]
              + setup}
    if job.gpus_per_node:
        params["gpus_per_node"] = job.gpus_per_node
    if job.cpus_per_node:
        params["cpus_per_task"] = job.cpus_per_node // job.procs_per_node
    if job.gpus_per_node and job.gpu_request == "gres":
        params["slurm_gres"] = f"gpu:{params.pop('gpus_per_node')}"
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(job, key):
            params[f"slurm_{key}"] = getattr(job, key)
    if job.exclusive:
        params["slurm_exclusive"] = True
    if job.signal:
        if job.signal.endswith("@auto"):
            raise ValueError("parameters need the signal in seconds: preflight.resolve(cfg, figures) first")
        params["slurm_signal_delay_s"] = int(job.signal.split("@")[1])
    if job.sbatch:
        params["slurm_additional_parameters"] = dict(_option(o) for o in job.sbatch)
    return params


def _option(option: str) -> tuple[str, str | bool]:
    """`--mail-type=END` -> ("mail_type", "END") as submitit's slurm_additional_parameters spell it."""
    name, _, value = option.removeprefix("--").partition("=")
    return name.replace("-", "_"), value or True


def command(cfg: LaunchConfig) -> list[str]:
    """Each task's command; `python` means submitit's own interpreter, the one it runs tasks with."""
    return [sys.executable if cfg.job.python == "python" else cfg.job.python, *torchrun.train_args(cfg)]


def folder(cfg: LaunchConfig) -> Path:
    """A fresh folder per launch: SLURM job ids restart with a new state directory, and submitit
    would otherwise read a stale result of an old job with the same id."""
    return Path(cfg.job.output_dir) / "submitit" / f"{cfg.job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def submit(cfg: LaunchConfig) -> tuple[str, list[str]]:
    """Submit; returns (SLURM job id, log files of the first task)."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=folder(cfg) / "%j", cluster="slurm")
    executor.update_parameters(**parameters(cfg))
    job = executor.submit(TrainTask(command(cfg), {"PYTHONUNBUFFERED": "1"}))
    return job.job_id, [str(job.paths.stdout), str(job.paths.stderr)]


def describe(cfg: LaunchConfig) -> str:
    """What --dry-run prints: the executor parameters and each task's command."""
    argv = command(cfg)
    params = "\n".join(f"  {k} = {v!r}" for k, v in parameters(cfg).items())
    return (f"submitit.AutoExecutor(folder={str(Path(cfg.job.output_dir) / 'submitit')!r}/<fresh>/%j, cluster='slurm')\n"
            f"update_parameters:\n{params}\n"
            f"each of {cfg.job.world_size} tasks: export the torch distributed variables, then run\n"
            f"  {torchrun.shell_line(argv)}")

