"""The launch config: where and on how many machines a training recipe runs.

A launch TOML has a `[job]` section (backend, nodes, processes, SLURM resources, environment,
setup commands, output directory), an optional `[parallel]` section (the recipe's layout, checked
with the recipe's own `ParallelConfig` and passed on as `--parallel.key=value`) and a `[recipe]`
section (the `tessera train` config and its overrides). The recipe itself is loaded with its
overrides at launch time, so a typo fails here and not after hours in a queue.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.core.config import (
    ConfigError, ParallelConfig, merge, read_toml, build_section, load_config, parse_override,
)

Backend = Literal["local", "torchrun", "slurm", "submitit"]
LAUNCH_SECTIONS = ("job", "parallel", "recipe")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class JobConfig:
    backend: Backend = "local"
    name: str = "tessera"
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 0  # processes per node; 0: gpus_per_node, or 1 without GPUs
    cpus_per_node: int = 0  # CPUs per node in every backend, split evenly over its tasks; 0: not requested
    gpu: str = ""  # the nodes' GPU (h100, h200, a100: the planner's table): checks the layout fits; "": no check
    gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"  # SLURM: --gpus-per-node=N or --gres=gpu:N
    mem: str = ""  # SLURM --mem, e.g. "64G"; "0" is the whole node
    time: str = ""  # SLURM --time, e.g. "2-00:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    output_dir: str = "runs/jobs"  # scripts, logs and the job registry
    python: str = "python"  # the interpreter on the nodes
    torchrun: str = "torchrun"
    port: int = 29500  # rendezvous port on the first node
    max_restarts: int = 0  # torchrun restarts of the whole group after a failure
    signal: str = "USR1@auto"  # SLURM: signal SECONDS before the time limit ("auto": from the checkpoint's size); "" for none
    ckpt_write_gbps: float = 5.0  # the storage's checkpoint write bandwidth (GB/s, whole job), for signal "auto"
    requeue: bool = True  # SLURM: a job stopped by `signal`, or whose step failed (up to max_restarts), requeues and resumes
    sbatch: tuple[str, ...] = ()  # extra #SBATCH options, e.g. ["--reservation=r1", "--exclude=n7", "--mail-type=END"]
    socket_ifname: str = ""  # NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME of the nodes, e.g. "ib0"; "": NCCL's choice
    dist_timeout_s: int = 0  # collective timeout of the process group (TESSERA_DIST_TIMEOUT_S); 0: torch's 10 min
    log_ranks: str = ""  # torchrun --local-ranks-filter: local ranks shown on the console, e.g. "0"; "": all
    slurm_tasks: Literal["node", "process"] = "node"  # one srun task per node (torchrun) or per process
    node_rank: int = 0  # torchrun backend: the node whose command runs here
    hosts: tuple[str, ...] = ()  # torchrun backend: node addresses, the first is the endpoint
    env: tuple[tuple[str, str], ...] = ()  # exported before the training command
    setup: tuple[str, ...] = ()  # slurm, submitit: shell lines run before the training command

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class RecipeConfig:
    command: Literal["train", "sft", "rm", "dpo", "ppo", "grpo", "clip"] = "train"  # the stage that runs the recipe
    path: str = ""  # its config, relative to the directory `tessera launch` runs in
    overrides: tuple[str, ...] = ()  # `--section.key=value` for the recipe


@dataclass(frozen=True)
class LaunchConfig:
    job: JobConfig = field(default_factory=JobConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    parallel: tuple[str, ...] = ()  # the layout as `--parallel.key=value`

    def train_overrides(self) -> list[str]:
        """Everything the recipe is run with: its overrides, then the layout."""
        return [*self.recipe.overrides, *self.parallel]


_JOB_TYPES = typing.get_type_hints(JobConfig)


def _flatten(values: dict, prefix: str) -> list[str]:
    """{"train": {"steps": 5}} -> ["--train.steps=5"], values written as TOML."""
    out = []
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.extend(_flatten(value, name))
        else:
            out.append(f"--{name}={_toml(value)}")
    return out


def _toml(value: Any) -> str:
    """A value as `parse_override` reads it back: strings stay bare unless TOML would change them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        bare = re.fullmatch(r"[A-Za-z0-9_./:+@-]+", value) and parse_override(f"--x={value}")[1] == value
        return value if bare else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={value!r} must be a list of strings")
    return tuple(value)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"job.env={value!r} must be a table of NAME = value")
    out = []
    for name, v in value.items():
        if not _ENV_NAME.match(name):
            raise ConfigError(f"job.env: {name!r} is not a valid environment variable name")
        if isinstance(v, (dict, list)):
            raise ConfigError(f"job.env.{name}={v!r} must be a string, number or bool")
        out.append((name, v if isinstance(v, str) else _toml(v)))
    return tuple(out)


def _build_job(values: dict) -> JobConfig:
    values = dict(values)
    special = {k: values.pop(k) for k in ("hosts", "env", "setup", "sbatch") if k in values}
    job = build_section(JobConfig, values, "job")
    for key in ("hosts", "setup", "sbatch"):
        if key in special:
            job = dataclasses.replace(job, **{key: _strings(f"job.{key}", special[key])})
    if "env" in special:
        job = dataclasses.replace(job, env=_env(special["env"]))
    return job


def _build_recipe(values: dict) -> RecipeConfig:
    values = dict(values)
    overrides = values.pop("overrides", {})
    recipe = build_section(RecipeConfig, values, "recipe")
    if not isinstance(overrides, dict):
        raise ConfigError(f"recipe.overrides={overrides!r} must be a table, e.g. train.steps = 100")
    return dataclasses.replace(recipe, overrides=tuple(_flatten(overrides, "")))


def validate_job(job: JobConfig) -> None:
    """Reject jobs that cannot be submitted, naming the key and what is valid."""
    for key in ("nodes", "port"):
        if getattr(job, key) < 1:
            raise ConfigError(f"job.{key}={getattr(job, key)} must be positive")
    for key in ("gpus_per_node", "nproc_per_node", "cpus_per_node", "max_restarts", "node_rank", "dist_timeout_s"):
        if getattr(job, key) < 0:
            raise ConfigError(f"job.{key}={getattr(job, key)} must be >= 0")
    if job.cpus_per_node % tasks_per_node(job):
        raise ConfigError(f"job.cpus_per_node={job.cpus_per_node} must divide evenly over the node's "
                          f"{tasks_per_node(job)} tasks (job.slurm_tasks={job.slurm_tasks!r}, backend {job.backend!r})")
    if job.ckpt_write_gbps <= 0:
        raise ConfigError(f"job.ckpt_write_gbps={job.ckpt_write_gbps} must be > 0")
    bad = [o for o in job.sbatch if not re.fullmatch(r"--[a-z][a-z-]*(=\S.*)?", o)]
    if bad:
        raise ConfigError(f"job.sbatch: {bad[0]!r} is not an sbatch option; valid: '--option=value', e.g. '--reservation=r1'")
    if job.log_ranks and not re.fullmatch(r"\d+(,\d+)*", job.log_ranks):
        raise ConfigError(f"job.log_ranks={job.log_ranks!r} is not valid; valid: '' or local ranks such as '0' or '0,1'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", job.name):
        raise ConfigError(f"job.name={job.name!r} may contain only letters, digits, '_', '.', '-'")
    if job.time and not _SLURM_TIME.match(job.time):
        raise ConfigError(f"job.time={job.time!r} is not a SLURM time; valid: MM, HH:MM:SS, D-HH:MM:SS")
    if job.signal and not re.fullmatch(r"(B:)?[A-Z0-9]+@(\d+|auto)", job.signal):
        raise ConfigError(f"job.signal={job.signal!r} is not valid; valid: '' or SIG@SECONDS or SIG@auto, e.g. USR1@90")
    if job.setup and job.backend in ("local", "torchrun"):
        raise ConfigError(f"job.setup runs in batch scripts only; valid with job.backend='slurm' or 'submitit' "
                          f"(for job.backend={job.backend!r}, run it in your shell first)")
    if job.backend == "local" and job.nodes != 1:
        raise ConfigError(f"job.nodes={job.nodes} with job.backend='local'; valid: 1 (or backend torchrun, slurm, submitit)")
    if job.backend == "torchrun" and job.nodes > 1:
        if len(job.hosts) != job.nodes:
            raise ConfigError(f"job.hosts has {len(job.hosts)} entries for job.nodes={job.nodes}; "
                              "list every node's address, the rendezvous endpoint first")
        if job.node_rank >= job.nodes:
            raise ConfigError(f"job.node_rank={job.node_rank} must be below job.nodes={job.nodes}")


def tasks_per_node(job: JobConfig) -> int:
    """SLURM tasks on each node: one torchrun (sbatch, slurm_tasks "node") or one per process (submitit, "process")."""
    return 1 if job.backend != "submitit" and job.slurm_tasks == "node" else job.procs_per_node


def _parallel(values: dict, world: int) -> tuple[str, ...]:
    """The `[parallel]` keys checked against the recipe's ParallelConfig and the job's world size."""
    layout = build_section(ParallelConfig, values, "parallel")
    fixed = layout.dp_replicate * layout.tp * (layout.dp_shard if layout.dp_shard > 0 else 1)
    if (layout.dp_shard == -1 and world % fixed) or (layout.dp_shard != -1 and fixed != world):
        raise ConfigError(f"parallel dp_replicate={layout.dp_replicate} x dp_shard={layout.dp_shard} x tp={layout.tp} "
                          f"does not fit job.nodes x processes per node = {world} processes")
    return tuple(_flatten(values, "parallel"))


def _patch(raw: dict, overrides: list[str]) -> dict:
    """Apply `--key=value`: `job.`, `recipe.` and `parallel.` keys patch the launch config,
    any other key is a recipe override."""
    for arg in overrides:
        keys, value = parse_override(arg)
        if len(keys) == 2 and keys[0] == "job" and _JOB_TYPES.get(keys[1]) is str and not isinstance(value, str):
            value = arg.split("=", 1)[1]  # SLURM's 01:00:00, 60, 0 or 1234 as written, not TOML's time or number
        keys = keys if keys[0] in LAUNCH_SECTIONS else ["recipe", "overrides", *keys]
        raw = merge(raw, _nest(keys, value))
    return raw


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def load_launch_config(path: str | Path, overrides: list[str] = ()) -> LaunchConfig:
    """A validated LaunchConfig from a launch TOML and `--key=value` overrides."""
    raw = _patch(read_toml(Path(path)), list(overrides))
    unknown = sorted(set(raw) - set(LAUNCH_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in {path}; valid: {', '.join(LAUNCH_SECTIONS)} "
                          "(recipe keys go under [recipe.overrides])")
    for section in LAUNCH_SECTIONS:
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{section} must be a section, got {raw[section]!r}")
    job = _build_job(raw.get("job", {}))
    validate_job(job)
    recipe = _build_recipe(raw.get("recipe", {}))
    if not recipe.path:
        raise ConfigError(f"recipe.path is missing in {path}: name the `tessera train` config to run")
    if not Path(recipe.path).is_file():
        raise ConfigError(f"recipe.path={recipe.path!r} does not exist (relative paths are read from {Path.cwd()})")
    cfg = LaunchConfig(job, recipe, _parallel(raw.get("parallel", {}), job.world_size))
    try:
        load_config(recipe.path, cfg.train_overrides())
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe.path} with its overrides: {e}") from None
    return cfg
