"""The training command lines: one process, torchrun on one node, torchrun per node with c10d.

Every backend runs one of these; they differ only in where the command runs and who fills in
the rendezvous endpoint. Commands are argument lists; `shell_line` quotes them for scripts.
torchrun tees every worker's output to a file per rank under the log directory and prefixes its
console lines with the global rank (`[3]:...`); `job.log_ranks` keeps only some local ranks on
the console.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from tessera.launchers.config import LaunchConfig

# After a restart, ranks that reuse the rendezvous store's TCP server can read the dead group's
# address (measured: "Gloo connectFullMesh failed ... Connection refused" in 2 of 5 restarts).
RESTART_ENV = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
# torchrun forwards these to its workers and waits for them; SIGUSR1 is the preemption notice.
SIGNALS_ENV = ("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
PREFIX_ENV = ("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[${rank}]:")
# Library deprecation notices (DeepSpeed's ~170 FutureWarnings) are for developers, not for a run's log.
WARNINGS_ENV = ("PYTHONWARNINGS", "ignore::FutureWarning")
# GPU jobs: NCCL warnings only, a failed collective aborts the job (so SLURM/torchrun restart it),
# and the flight recorder keeps the last collectives and dumps them on a timeout.
NCCL_ENV = (("NCCL_DEBUG", "WARN"), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"), ("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"),
            ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"))


def resumes(cfg: LaunchConfig) -> bool:
    """Whether the run may start again by itself (requeue, restart), so must resume from its checkpoint."""
    job = cfg.job
    restarts = job.max_restarts > 0 or (job.backend in ("slurm", "submitit") and job.requeue)
    given = any(o.startswith("--checkpoint.resume=") for o in cfg.train_overrides())
    return restarts and not given


def train_args(cfg: LaunchConfig) -> list[str]:
    """`-m tessera train RECIPE --k=v ...` (or the recipe's alignment stage: sft, rm, dpo, ...), with
    `--checkpoint.resume=auto` when the run may restart."""
    args = ["-m", "tessera", cfg.recipe.command, cfg.recipe.path, *cfg.train_overrides()]
    return [*args, "--checkpoint.resume=auto"] if resumes(cfg) else args


def uses_torchrun(cfg: LaunchConfig) -> bool:
    return cfg.job.world_size > 1 or cfg.job.max_restarts > 0


def log_dir(cfg: LaunchConfig, run_id: str) -> str:
    """Where torchrun writes each rank's stdout and stderr (`run_id` may be a shell variable)."""
    return str(Path(cfg.job.output_dir) / f"{cfg.job.name}-{run_id}-ranks")


def _logging(cfg: LaunchConfig, run_id: str) -> list[str]:
    ranks = ["--local-ranks-filter", cfg.job.log_ranks] if cfg.job.log_ranks else []
    return ["--tee", "3", "--log-dir", log_dir(cfg, run_id), *ranks]


def single_node(cfg: LaunchConfig, run_id: str = "local") -> list[str]:
    """The command for one machine: python for one process, else torchrun --standalone (its own
    free port on localhost, so that jobs sharing a node never share a rendezvous)."""
    job = cfg.job
    if not uses_torchrun(cfg):
        return [job.python, *train_args(cfg)]
    return [job.torchrun, "--standalone", "--nproc_per_node", str(job.procs_per_node), *_logging(cfg, run_id),
            *_restarts(cfg), *train_args(cfg)]


def multi_node(cfg: LaunchConfig, nnodes: str, endpoint: str, rdzv_id: str, host_args: list[str] = ()) -> list[str]:
    """torchrun joining a c10d rendezvous at `endpoint`; the arguments may be shell variables.
    `host_args` name this node's address and whether it hosts the store (`is_host`): given
    explicitly, a store that cannot bind its port fails loudly instead of joining another job's."""
    job = cfg.job
    return [job.torchrun, "--nnodes", nnodes, "--nproc_per_node", str(job.procs_per_node),
            "--rdzv-id", rdzv_id, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            *host_args, *_logging(cfg, rdzv_id), *_restarts(cfg), *train_args(cfg)]


def per_node(cfg: LaunchConfig) -> list[list[str]]:
    """The torchrun backend: one command per entry of job.hosts, the first hosting the rendezvous."""
    job = cfg.job
    if job.nodes == 1:
        return [single_node(cfg, job.name)]
    endpoint = f"{job.hosts[0]}:{job.port}"
    commands = []
    for rank, host in enumerate(job.hosts):
        host_args = ["--local-addr", host, "--rdzv-conf", f"is_host={'true' if rank == 0 else 'false'}"]
        commands.append(multi_node(cfg, str(job.nodes), endpoint, job.name, host_args))
    return commands


def _restarts(cfg: LaunchConfig) -> list[str]:
    return ["--max-restarts", str(cfg.job.max_restarts)] if cfg.job.max_restarts else []


def environment(cfg: LaunchConfig, preemptible: bool = False, lead_s: int = 0) -> list[tuple[str, str]]:
    """The variables a launch exports: the defaults for logs, NCCL and restarts, then job.env (which
    wins). `lead_s`: how long a preempted run may take to save, for torchrun's shutdown wait."""
    job = cfg.job
    if not (uses_torchrun(cfg) or job.backend in ("slurm", "submitit")):
        return list(job.env)  # one process on this machine: nothing to prefix, restart or reach
    env = [WARNINGS_ENV]
    if uses_torchrun(cfg):  # workers write to tee'd files: unbuffered, so the console follows them line by line
        env += [PREFIX_ENV, ("PYTHONUNBUFFERED", "1")]
    if job.gpus_per_node:
        env += [*NCCL_ENV, ("TORCH_FR_DUMP_TEMP_FILE", str(Path(job.output_dir) / f"{job.name}-nccl-trace-rank-"))]
    if job.socket_ifname:
        env += [("NCCL_SOCKET_IFNAME", job.socket_ifname), ("GLOO_SOCKET_IFNAME", job.socket_ifname)]
    if job.dist_timeout_s:
        env.append(("TESSERA_DIST_TIMEOUT_S", str(job.dist_timeout_s)))
    if uses_torchrun(cfg) and job.max_restarts:
        env.append(RESTART_ENV)
    if uses_torchrun(cfg) and preemptible and job.signal:
        # the workers may take until the time limit to save; torchrun's default is 30 s
        env += [SIGNALS_ENV, ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(lead_s))]
    given = {name for name, _ in job.env}
    return [(k, v) for k, v in env if k not in given] + list(job.env)


def shell_line(argv: list[str], expand: tuple[str, ...] = ()) -> str:
    """`argv` quoted for a shell; the words in `expand` (ours, holding shell variables) are
    double-quoted so that the variables expand, every other word is taken literally."""
    return " ".join(f'"{a}"' if a in expand else shlex.quote(a) for a in argv)
