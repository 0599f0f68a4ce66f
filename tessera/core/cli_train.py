"""`tessera train | sft | rm | dpo | ppo | grpo`: a run assembled from its config, the placement the launcher's
environment implies, the task the command names, and the trainer; the one place that wires
`core`, `distributed`, `alignment`, `interop` and `launchers` together for training."""
from __future__ import annotations

import signal

from tessera.core.config import ConfigError

EXIT_INTERRUPTED = 3  # launchers requeue a job that exits with this code


class TrainingInterrupted(Exception):
    """A run stopped early at request (preemption, SIGTERM) after a checkpoint: exit code 3."""


def cmd_train(args, overrides: list[str]) -> None:
    """One code path for every layout: the placement (one process, FSDP/TP ranks, DeepSpeed) comes
    from the environment torchrun or SLURM set, the rest is the same trainer."""
    from tessera.core.build import build_trainer

    def build(cfg, placement, init_weights):
        cfg, trainer = build_trainer(cfg, placement, init_weights, _stage_task(args.command, cfg))
        if cfg.log.gpu_telemetry and placement.device.type == "cuda" and placement.rank == 0:
            from tessera.launchers.telemetry import GpuTelemetry

            trainer.parts.telemetry = GpuTelemetry()
        return cfg, trainer

    cfg, placement, trainer, start, final = _fit(args, overrides, build)
    trainer.parts.metrics.close()
    keys = ("loss", "val_loss", "tokens_per_s", "accuracy", "val_accuracy", "val_margin")
    _finish(cfg, placement, trainer, trainer.parts.checkpointer, args.command != "rm",
            f"steps {start}..{trainer.step} in {cfg.train.run_dir}: {_summary(final, keys)}")


def cmd_rl(args, overrides: list[str]) -> None:
    """`tessera ppo | grpo`: the rollout-and-update loop of `alignment.rl_run` in place of the trainer,
    on the same placements, with the same signals and resume."""
    from tessera.alignment.rl_run import RLRun

    def build(cfg, placement, init_weights):
        run = RLRun(args.command, cfg, placement, init_weights)
        return run.cfg, run

    cfg, placement, run, start, metrics = _fit(args, overrides, build)
    keys = ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "response_len")
    _finish(cfg, placement, run, run.checkpointer, True,
            f"{args.command} steps {start}..{run.step} in {cfg.train.run_dir}: {_summary(metrics, keys)}; "
            f"policy in {run.checkpointer.latest()}")


def _fit(args, overrides: list[str], build):
    """The config (with --resume and model.init_from), the placement from the environment, and the
    run `build(cfg, placement, init_weights) -> (cfg, run)` makes of them, fitted. SIGUSR1 (SLURM's
    preemption warning) and SIGTERM ask the run to checkpoint after the current step and stop.
    Returns (cfg, placement, run, first step, last metrics)."""
    from tessera.core.config import load_config
    from tessera.distributed.env import destroy
    from tessera.distributed.placement import placement_for

    if args.resume:
        overrides = [*overrides, f'--checkpoint.resume="{args.resume}"']
    cfg, init_weights = _init_from(load_config(args.config, overrides))
    try:
        placement = placement_for(cfg)
        cfg, run = build(cfg, placement, init_weights)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda *_: run.request_stop())
        start = run.step
        metrics = run.fit()
    finally:
        destroy()
    return cfg, placement, run, start, metrics


def _summary(metrics: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in keys)


def _finish(cfg, placement, run, checkpointer, exports_lora: bool, what: str) -> None:
    """The first rank says what ran and writes a finished LoRA run's adapter/ and merged/; a run
    stopped at request raises TrainingInterrupted (exit code 3)."""
    if placement.rank == 0:
        print(f"{'stopped at request after' if run.stopped_early else 'trained'} {what}")
        if exports_lora and cfg.lora.r > 0 and not run.stopped_early:
            _export_lora(checkpointer.latest(), cfg)
    if run.stopped_early:
        raise TrainingInterrupted(f"checkpointed step {run.step} of {cfg.train.steps}; resume with --resume auto")


def _export_lora(ckpt, cfg) -> None:
    from tessera.alignment.lora import export_from_checkpoint

    adapter, merged = export_from_checkpoint(ckpt, cfg.lora, cfg.train.run_dir)
    print(f"wrote adapters to {adapter} and the merged model to {merged}")


def _stage_task(command: str, cfg):
    """The task of `tessera sft|rm|dpo` (None: pretraining, `tessera train`)."""
    if command == "train":
        if cfg.lora.r > 0:
            raise ConfigError("lora.r > 0 is for fine-tuning stages (tessera sft | dpo | rm); tessera train "
                              "trains every weight")
        return None
    from tessera.alignment.dpo import DPOTask
    from tessera.alignment.reward import RewardTask
    from tessera.alignment.sft import SFTTask

    return {"sft": SFTTask, "rm": RewardTask, "dpo": DPOTask}[command](cfg)


def _init_from(cfg):
    """With `model.init_from` ("hf:DIR" or a checkpoint): the source's architecture and tokenizer in the
    config, and the function that copies its weights into the new model."""
    if not cfg.model.init_from:
        return cfg, None
    import dataclasses
    from functools import partial

    from tessera.core.config import validate
    from tessera.interop.hf import init_model_config, init_tokenizer_path, load_init_weights

    cfg = dataclasses.replace(cfg, model=init_model_config(cfg.model))
    validate(cfg)
    tokenizer = init_tokenizer_path(cfg.model)
    if tokenizer and not cfg.data.tokenizer:  # data prepared with another tokenizer is then refused
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer)))
    return cfg, partial(load_init_weights, init_from=cfg.model.init_from)
