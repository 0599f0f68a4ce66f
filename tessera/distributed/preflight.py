"""The checks a launch runs before it submits, on the login node: the recipe's data and tokenizer,
and the planner's per-GPU memory, step time and checkpoint size for the job's layout.

The data check is the training run's own (`LanguageModelingTask` reads the manifest and refuses
data of another tokenizer; the alignment stages' JSONL must exist), so a job that would fail in
its first second fails here instead, before it waits in a queue. Launchers import no training
code, so they run this module as a command:

    python -m tessera.distributed.preflight '{"command": "train", "config": ..., "overrides": [...],
        "world": 64, "gpus_per_node": 8, "gpu": "h100", "data": true}'

It prints one JSON line ({"ckpt_bytes", "step_s", "peak_gib", "mem_gib"}) or, exit status 2, one
line naming the problem.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tessera.core.config import Config, ConfigError, load_config
from tessera.distributed.planner import GIB, Layout, checkpoint_bytes, hardware, plan
from tessera.distributed.vision_plan import Vision


def layout(cfg: Config, world: int) -> Layout:
    """The planner's Layout of a recipe's [parallel] section on `world` processes."""
    p = cfg.parallel
    shard = p.dp_shard if p.dp_shard > 0 else world // (p.dp_replicate * p.tp)
    return Layout(dp_replicate=p.dp_replicate, dp_shard=shard, tp=p.tp, ac=p.activation_checkpoint,
                  ac_every=p.checkpoint_every, precision="bf16" if p.mixed_precision == "bf16" else "fp32",
                  engine=p.engine, zero_stage=p.zero_stage)


def check_data(command: str, cfg: Config) -> Config:
    """The data and tokenizer check the training run makes first (ConfigError naming the problem);
    returns the config with model.vocab_size from the data where it is left at 0, as the run does."""
    if command == "train":
        from tessera.core.build import with_vocab
        from tessera.core.data import DataError
        from tessera.core.task import LanguageModelingTask

        try:
            return with_vocab(cfg, LanguageModelingTask(cfg).vocab_size)
        except (DataError, FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if not cfg.data.path or not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path!r} does not exist: `tessera {command}` reads its JSONL from it")
    return cfg


def preflight(command: str, config: str, overrides: list[str], world: int, gpus_per_node: int, gpu: str,
              data: bool = True) -> dict:
    """Check a recipe for a job of `world` processes; returns the planner's figures for the launcher."""
    cfg = load_config(config, overrides)
    if data:
        cfg = check_data(command, cfg)
    out = {"ckpt_bytes": 0, "step_s": 0.0, "peak_gib": 0.0, "mem_gib": 0.0}
    if cfg.model.vocab_size == 0:  # taken from the data, which a dry run does not read
        return out
    lay = layout(cfg, world)
    out["ckpt_bytes"] = checkpoint_bytes(cfg.model, lay)
    if gpu:
        try:
            hw = hardware(gpu, gpus_per_node=gpus_per_node)
            # train.seq_len is the longest length of a progressive schedule (config.validate): the peak
            est = plan(cfg.model, world, hw.mem_gb, cfg.train.seq_len, cfg.train.batch_size, lay, hw,
                       vision=Vision.of(cfg, command))
        except ValueError as e:
            raise ConfigError(f"job.gpu={gpu!r}: {e}") from None
        out.update(step_s=est.step_s, peak_gib=est.total / GIB, mem_gib=hw.mem_gb)
        if not est.fits:
            raise ConfigError(f"{lay.describe()} needs {est.total / GIB:.1f} GiB per GPU by the planner, more than a "
                              f"{gpu}'s {hw.mem_gb:g} GiB: see `tessera plan --model ... --gpus {world} --gpu {gpu}`")
    return out


def main(argv: list[str]) -> int:
    try:
        print(json.dumps(preflight(**json.loads(argv[0]))))
    except ConfigError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
