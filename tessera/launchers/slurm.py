"""SLURM through sbatch: the batch script, its submission, and the state of submitted jobs.

The script runs one `srun` task per node, each a torchrun that joins a c10d rendezvous on the
job's first node (`job.slurm_tasks = "node"`): torchrun then owns the local processes, their
restarts (`job.max_restarts`) and their signals, exactly as on a machine without SLURM. The
other choice, one task per process reading SLURM_PROCID/SLURM_NTASKS with MASTER_ADDR exported
(`"process"`), needs no torchrun but gives up its restarts.

Rendezvous: one node runs `torchrun --standalone` (a free port of its own); several nodes meet
at the head node's address on a port of this job (job.port + job id mod 1000, the next free one),
the first node hosting the store (`is_host=true`), so two jobs on one node never share a store.

Preemption: `--signal=B:USR1@N` (N from the checkpoint's size, see preflight) signals only the
batch shell, which forwards the signal to the step (srun passes it on to the tasks; torchrun
passes it on to its workers); the trainer saves a checkpoint and exits; the shell then runs
`scontrol requeue` and exits 0. The requeued job runs the same script with
`--checkpoint.resume=auto` and continues from that checkpoint. A step that fails (a node's
torchrun dies) requeues the same way, up to job.max_restarts times.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tessera.core.config import ConfigError
from tessera.launchers import torchrun
from tessera.launchers.config import LaunchConfig, tasks_per_node

ENDPOINT = "$TESSERA_RDZV_ENDPOINT"
JOB_ID = "$SLURM_JOB_ID"
STATES_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def script_path(cfg: LaunchConfig) -> Path:
    return Path(cfg.job.output_dir) / f"{cfg.job.name}.sbatch"


def log_pattern(cfg: LaunchConfig) -> str:
    return str(Path(cfg.job.output_dir) / f"{cfg.job.name}-%j.out")


def exit_file(output_dir: str | Path, name: str, job_id: str) -> Path:
    """Written by the script with the training's exit status, for when SLURM has forgotten the job."""
    return Path(output_dir) / f"{name}-{job_id}.exit"


def signal_name(cfg: LaunchConfig) -> str:
    return cfg.job.signal.removeprefix("B:").split("@")[0]


def directives(cfg: LaunchConfig, workdir: str) -> list[str]:
    job = cfg.job
    lines = [f"--job-name={job.name}", f"--nodes={job.nodes}", f"--ntasks-per-node={tasks_per_node(job)}"]
    if job.gpus_per_node:
        lines.append(f"--gres=gpu:{job.gpus_per_node}" if job.gpu_request == "gres" else f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        lines.append(f"--cpus-per-task={job.cpus_per_node // tasks_per_node(job)}")
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        if getattr(job, key):
            lines.append(f"--{key}={getattr(job, key)}")
    if job.exclusive:
        lines.append("--exclusive")
    lines += [f"--chdir={workdir}", f"--output={log_pattern(cfg)}", "--open-mode=append"]
    if job.signal:
        lines.append(f"--signal=B:{job.signal.removeprefix('B:')}")
    lines.append("--requeue" if job.requeue else "--no-requeue")
    return [f"#SBATCH {line}" for line in [*lines, *job.sbatch]]


def step_command(cfg: LaunchConfig) -> str:
    """The srun line: torchrun per node (one node: --standalone, its own free port), or the
    training module per process."""
    job = cfg.job
    srun = ["srun", "--kill-on-bad-exit=1"]
    if job.slurm_tasks == "process":
        return torchrun.shell_line([*srun, job.python, *torchrun.train_args(cfg)])
    srun.append("--ntasks-per-node=1")
    logs = torchrun.log_dir(cfg, JOB_ID)
    if job.nodes == 1 and torchrun.uses_torchrun(cfg):
        return torchrun.shell_line([*srun, *torchrun.single_node(cfg, JOB_ID)], expand=(logs,))
    if job.nodes == 1:
        return torchrun.shell_line([*srun, *torchrun.single_node(cfg)])
    nnodes = "$SLURM_JOB_NUM_NODES"
    node = torchrun.multi_node(cfg, nnodes, ENDPOINT, JOB_ID, ["--rdzv-conf", "is_host=$is_host"])
    inner = torchrun.shell_line(node, expand=(nnodes, ENDPOINT, JOB_ID, logs, "is_host=$is_host"))
    # each node's task decides whether it hosts the rendezvous store: the first node does
    per_task = f'is_host=false; [ "$SLURM_NODEID" = 0 ] && is_host=true; exec {inner}'
    return torchrun.shell_line([*srun, "bash", "-c", per_task])


def _port_lines(cfg: LaunchConfig) -> list[str]:
    """The head node's address and a rendezvous port of this job: job.port + the job id mod 1000,
    the next free one if taken (the script runs on the head node, so it can check)."""
    probe = 'import socket, sys; socket.create_server(("", int(sys.argv[1]))).close()'
    return ['head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            'head_addr="$(getent ahostsv4 "$head_node" | awk \'NR == 1 {print $1}\')"',
            'head_addr="${head_addr:-$head_node}"',
            f"port=$(({cfg.job.port} + SLURM_JOB_ID % 1000))",
            f"until {torchrun.shell_line([cfg.job.python, '-c', probe])} \"$port\" 2>/dev/null; do port=$((port + 1)); done"]


def render(cfg: LaunchConfig, workdir: str | None = None) -> str:
    """The sbatch script for `cfg` (its signal in seconds, see preflight.resolve), run from `workdir`
    (default: this directory)."""
    job = cfg.job
    if job.slurm_tasks == "process" and job.max_restarts:
        raise ConfigError("job.max_restarts needs torchrun; valid with it: job.slurm_tasks='node'")
    if job.signal.endswith("@auto"):
        raise ValueError("render needs the signal in seconds: preflight.resolve(cfg, figures) first")
    workdir = workdir or os.getcwd()
    lead = int(job.signal.split("@")[1]) if job.signal else 0
    env = torchrun.environment(cfg, preemptible=bool(job.signal), lead_s=lead)
    if job.slurm_tasks == "process":
        env = [(k, v) for k, v in env if k != torchrun.PREFIX_ENV[0]]
    lines = ["#!/bin/bash", *directives(cfg, workdir),
             f"# Written by `tessera launch` for {cfg.recipe.path}: "
             + ("one srun task per node, each a torchrun joining the rendezvous on the first node."
                if job.slurm_tasks == "node" else "one srun task per process, ranks from SLURM variables."),
             "set -euo pipefail"]
    lines += [f"export {name}={torchrun.shell_line([value])}" for name, value in env]
    if job.setup:  # module and conda scripts read unset variables
        lines += ["set +u", *job.setup, "set -u"]
    if job.slurm_tasks == "process":
        lines += [*_port_lines(cfg), 'export MASTER_ADDR="$head_addr"', 'export MASTER_PORT="$port"']
    elif job.nodes > 1:
        lines += [*_port_lines(cfg), 'export TESSERA_RDZV_ENDPOINT="$head_addr:$port"']
    lines += ['echo "tessera: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
              "set +e", f"{step_command(cfg)} &", "step=$!", "stopping=0"]
    if job.signal:
        sig = signal_name(cfg)
        lines.append(f"trap 'stopping=1; echo tessera: SIG{sig}, checkpoint and stop; kill -{sig} \"$step\"' {sig}")
    lines += ['while :; do wait "$step"; rc=$?; kill -0 "$step" 2>/dev/null || break; done']
    if job.signal and job.requeue:
        lines += ['if [ "$stopping" = 1 ]; then',
                  '  echo "tessera: requeueing job $SLURM_JOB_ID"',
                  '  scontrol requeue "$SLURM_JOB_ID"',
                  "  exit 0",
                  "fi"]
    if job.requeue and job.max_restarts:
        lines += [f'if [ "$rc" != 0 ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {job.max_restarts} ]; then',
                  f'  echo "tessera: step failed (exit $rc); requeueing job $SLURM_JOB_ID to resume from its last checkpoint '
                  f'(restart $((${{SLURM_RESTART_COUNT:-0}} + 1)) of {job.max_restarts})"',
                  '  scontrol requeue "$SLURM_JOB_ID"',
                  "  exit 0",
                  "fi"]
    exit_path = exit_file(job.output_dir, job.name, "$SLURM_JOB_ID")
    lines += [f'echo "$rc" > "{exit_path}"', 'exit "$rc"', ""]
    return "\n".join(lines)


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"{argv[0]} is not on PATH: job.backend='slurm' needs the SLURM client commands")
    return subprocess.run(argv, capture_output=True, text=True)


def submit(cfg: LaunchConfig) -> tuple[str, Path]:
    """Write the script into job.output_dir and sbatch it; returns (job id, script path)."""
    path = script_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(cfg))
    proc = _run(["sbatch", "--parsable", str(path)])
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0], path


def state(job_id: str) -> str | None:
    """The job's SLURM state from squeue, scontrol or sacct, in that order; None when none knows it."""
    proc = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.split()[0]
    proc = _run(["scontrol", "show", "job", job_id])
    match = re.search(r"JobState=(\w+)", proc.stdout) if proc.returncode == 0 else None
    if match:
        return match.group(1)
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()[0].rstrip("+")
    return None


def cancel(job_id: str) -> None:
    proc = _run(["scancel", job_id])
    if proc.returncode != 0:
        raise ConfigError(f"scancel {job_id} failed: {proc.stderr.strip()}")
