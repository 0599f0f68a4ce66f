"""The training command lines: one process, torchrun on one node, torchrun per node with c10d.

Every backend runs one of these; they differ only in where the command runs and who fills in
the rendezvous endpoint. Commands are argument lists; `shell_line` quotes them for scripts.
"""
from __future__ import annotations

import shlex

from tessera.launchers.config import LaunchConfig

# After a restart, ranks that reuse the rendezvous store's TCP server can read the dead group's
# address (measured: "Gloo connectFullMesh failed ... Connection refused" in 2 of 5 restarts).
RESTART_ENV = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
# torchrun forwards these to its workers and waits for them; SIGUSR1 is the preemption notice.
SIGNALS_ENV = ("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")


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


def single_node(cfg: LaunchConfig) -> list[str]:
    """The command for one machine: python for one process, else torchrun --standalone."""
    job = cfg.job
    if not uses_torchrun(cfg):
        return [job.python, *train_args(cfg)]
    return [job.torchrun, "--standalone", "--nproc_per_node", str(job.procs_per_node),
            *_restarts(cfg), *train_args(cfg)]


def multi_node(cfg: LaunchConfig, nnodes: str, endpoint: str, rdzv_id: str, host_args: list[str] = ()) -> list[str]:
    """torchrun joining a c10d rendezvous at `endpoint`; the arguments may be shell variables."""
    job = cfg.job
    return [job.torchrun, "--nnodes", nnodes, "--nproc_per_node", str(job.procs_per_node),
            "--rdzv-id", rdzv_id, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            *host_args, *_restarts(cfg), *train_args(cfg)]


def per_node(cfg: LaunchConfig) -> list[list[str]]:
    """The torchrun backend: one command per entry of job.hosts, the first hosting the rendezvous."""
    job = cfg.job
    if job.nodes == 1:
        return [single_node(cfg)]
    endpoint = f"{job.hosts[0]}:{job.port}"
    commands = []
    for rank, host in enumerate(job.hosts):
        host_args = ["--local-addr", host] + (["--rdzv-conf", "is_host=true"] if rank == 0 else [])
        commands.append(multi_node(cfg, str(job.nodes), endpoint, job.name, host_args))
    return commands


def _restarts(cfg: LaunchConfig) -> list[str]:
    return ["--max-restarts", str(cfg.job.max_restarts)] if cfg.job.max_restarts else []


def environment(cfg: LaunchConfig, preemptible: bool = False) -> list[tuple[str, str]]:
    """The variables a launch exports: job.env, then what restarts and preemption need."""
    env = list(cfg.job.env)
    if uses_torchrun(cfg) and cfg.job.max_restarts:
        env.append(RESTART_ENV)
    if uses_torchrun(cfg) and preemptible and cfg.job.signal:
        # the workers may take until the time limit to save; torchrun's default is 30 s
        env += [SIGNALS_ENV, ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", cfg.job.signal.split("@")[1])]
    return env


def shell_line(argv: list[str], expand: tuple[str, ...] = ()) -> str:
    """`argv` quoted for a shell; the words in `expand` (ours, holding shell variables) are
    double-quoted so that the variables expand, every other word is taken literally."""
    return " ".join(f'"{a}"' if a in expand else shlex.quote(a) for a in argv)
