"""`tessera launch LAUNCH.toml [--dry-run] [--key=value ...]`: one entry point for every backend.

The backends differ in where the training command runs: here (`local`), on each listed node
(`torchrun`, this node's command runs here), or on SLURM (`slurm`, `submitit`). `--dry-run`
prints exactly what would be run or submitted and touches nothing.

Before a SLURM job is submitted, `preflight.check` runs on this node the checks its first second
would run (config, data, tokenizer) and the planner's fit on `job.gpu`, and sizes the preemption
signal's lead; `--dry-run` runs the same minus the data check. The local and torchrun backends
start the training at once, whose first act is that same data check.
"""
from __future__ import annotations

from typing import Callable

from tessera.launchers import jobs, local, preflight, slurm, torchrun
from tessera.launchers.config import LaunchConfig, load_launch_config


def _env_prefix(env: list[tuple[str, str]]) -> str:
    return "".join(f"{name}={torchrun.shell_line([value])} " for name, value in env)


def plan(cfg: LaunchConfig) -> str:
    """The dry-run text of `cfg` (its signal resolved, see `preflight.resolve`)."""
    job = cfg.job
    if job.backend == "slurm":
        return f"sbatch --parsable {slurm.script_path(cfg)}\n--- {slurm.script_path(cfg)}\n{slurm.render(cfg)}"
    if job.backend == "submitit":
        from tessera.launchers import submitit_backend

        return submitit_backend.describe(cfg)
    env = _env_prefix(torchrun.environment(cfg))
    commands = torchrun.per_node(cfg) if job.backend == "torchrun" else [torchrun.single_node(cfg)]
    if len(commands) == 1:
        return env + torchrun.shell_line(commands[0])
    return "\n".join(f"# node {rank} ({host})\n{env}{torchrun.shell_line(cmd)}"
                     for rank, (host, cmd) in enumerate(zip(job.hosts, commands)))


def launch(path: str, overrides: list[str], dry_run: bool = False, echo: Callable[[str], None] = print) -> int:
    """Launch (or with `dry_run` describe) the job of a launch config; returns an exit status."""
    cfg = load_launch_config(path, overrides)
    figures = preflight.Figures()
    if preflight.needs_figures(cfg):
        figures = preflight.check(cfg, data=not dry_run)
        cfg = preflight.resolve(cfg, figures)
    job = cfg.job
    if dry_run:
        echo(plan(cfg))
        return 0
    if job.backend in ("local", "torchrun"):
        commands = torchrun.per_node(cfg) if job.backend == "torchrun" else [torchrun.single_node(cfg)]
        return local.run(cfg, commands[job.node_rank if job.backend == "torchrun" else 0], torchrun.environment(cfg))
    if job.backend == "slurm":
        job_id, script = slurm.submit(cfg)
        logs = [slurm.log_pattern(cfg).replace("%j", job_id)]
    else:
        from tessera.launchers import submitit_backend

        job_id, logs = submitit_backend.submit(cfg)
        script = None
    jobs.record(jobs.JobEntry(job_id, job.name, job.backend, job.output_dir, logs))
    echo(f"submitted job {job_id} ({job.name}, {job.nodes} node(s) x {job.procs_per_node} process(es))"
         + (f" from {script}" if script else "") + f"; log: {logs[0]}; tessera jobs status {job_id} --dir {job.output_dir}")
    if job.signal:
        echo(f"preemption: signal {job.signal.removeprefix('B:')} before the time limit; " + preflight.advice(cfg, figures))
    return 0
