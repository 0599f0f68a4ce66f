"""`tessera train | sft | rm | dpo | ppo | grpo | clip | vlm`: a run assembled from its config, the placement the
launcher's environment implies, the task the command names, and the one trainer."""
from __future__ import annotations

import dataclasses
import os
import signal
import warnings
from functools import partial

from tessera.cli.errors import TrainingInterrupted

RL_STAGES = ("ppo", "grpo")
SUMMARY_KEYS = ("loss", "val_loss", "tokens_per_s", "accuracy", "val_accuracy", "val_margin", "val_i2t_r1", "val_t2i_r1",
                "val_zero_shot_acc")
RL_SUMMARY_KEYS = ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "response_len")


def cmd_train(args, overrides: list[str]) -> None:
    """One code path for every stage and layout: the placement (one process, FSDP/TP ranks, DeepSpeed)
    comes from the environment torchrun or SLURM set, the task from the command, the rest is the
    same trainer. SIGUSR1 (SLURM's preemption warning) and SIGTERM ask the run to checkpoint after
    the current step and stop (exit 3)."""
    from tessera.core.build import build_trainer
    from tessera.core.config import load_config
    from tessera.distributed.env import destroy
    from tessera.distributed.placement import placement_for

    if args.resume:
        overrides = [*overrides, f'--checkpoint.resume="{args.resume}"']
    if args.overwrite:
        overrides = [*overrides, "--checkpoint.overwrite=true"]
    cfg, init_weights = _init_from(load_config(args.config, overrides))
    if args.command == "clip":
        from tessera.multimodal.clip_task import clip_config

        cfg = clip_config(cfg)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed\b")  # ~170 lines of its own deprecations
    try:
        placement = placement_for(cfg)
        if placement.rank != 0:  # one rank speaks for the job: a warning every rank hits prints once
            warnings.simplefilter("ignore")
        cfg, trainer = build_trainer(cfg, placement, init_weights, _task(args.command, cfg))
        if cfg.log.gpu_telemetry and placement.device.type == "cuda" and placement.rank == 0:
            from tessera.launchers.telemetry import GpuTelemetry

            trainer.parts.telemetry = GpuTelemetry()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda *_: trainer.request_stop())
        start = trainer.step
        final = trainer.fit()
        trainer.parts.metrics.close()
        getattr(trainer.engine, "close", lambda: None)()  # DeepSpeed: free its groups before the process group
    finally:
        destroy()
    if placement.rank == 0:
        rl = args.command in RL_STAGES
        summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k in (RL_SUMMARY_KEYS if rl else SUMMARY_KEYS))
        what = f"{args.command} " if rl else ""
        policy = f"; policy in {trainer.parts.checkpointer.latest()}" if rl else ""
        done = "stopped at request after" if trainer.stopped_early else "trained"
        print(f"{done} {what}steps {start}..{trainer.step} in {cfg.train.run_dir}: {summary}{policy}")
        if cfg.lora.r > 0 and args.command != "rm" and not trainer.stopped_early:
            _export_lora(trainer.parts.checkpointer.latest(), cfg, args.command)
    if trainer.stopped_early:  # every rank exits 3; the first one says why
        how = ("SLURM requeues the job and it resumes from there" if os.environ.get("SLURM_JOB_ID")
               else "resume with --resume auto")
        raise TrainingInterrupted(f"checkpointed step {trainer.step} of {cfg.train.steps}; {how}"
                                  if placement.rank == 0 else "")


def _export_lora(ckpt, cfg, command: str) -> None:
    """The adapters alone and the merged model, beside the run's checkpoints."""
    if command == "vlm":
        from tessera.multimodal.vlm_inference import export_lora

        adapter, merged = export_lora(ckpt, cfg.train.run_dir)
    else:
        from tessera.core.lora import export_from_checkpoint

        adapter, merged = export_from_checkpoint(ckpt, cfg.lora, cfg.train.run_dir)
    print(f"wrote adapters to {adapter} and the merged model to {merged}")


def _task(command: str, cfg):
    """The task of the command (None: pretraining, `tessera train`)."""
    if command == "train":
        if cfg.lora.r == 0:
            return None
        from tessera.alignment.lora_lm import LoRALanguageModelingTask

        return LoRALanguageModelingTask(cfg)
    if command == "clip":
        from tessera.multimodal.clip_task import CLIPTask

        return CLIPTask(cfg)
    if command == "vlm":
        from tessera.multimodal.vlm_task import VLMTask

        return VLMTask(cfg)
    if command in RL_STAGES:
        from tessera.alignment.rl_task import RLTask

        return RLTask(command, cfg)
    from tessera.alignment.dpo import DPOTask
    from tessera.alignment.reward import RewardTask
    from tessera.alignment.sft import SFTTask

    return {"sft": SFTTask, "rm": RewardTask, "dpo": DPOTask}[command](cfg)


def _init_from(cfg):
    """With `model.init_from` ("hf:DIR" or a checkpoint): the source's architecture and tokenizer in the
    config, and the function that copies its weights into the new model."""
    if not cfg.model.init_from:
        return cfg, None
    from tessera.core.config import validate
    from tessera.interop.hf import init_model_config, init_tokenizer_path, load_init_weights

    cfg = dataclasses.replace(cfg, model=init_model_config(cfg.model))
    validate(cfg)
    tokenizer = init_tokenizer_path(cfg.model)
    if tokenizer and not cfg.data.tokenizer:  # data prepared with another tokenizer is then refused
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer)))
    return cfg, partial(load_init_weights, init_from=cfg.model.init_from)


def config_keys() -> str:
    """Every section and key a config may hold, for `--help`."""
    import textwrap
    import typing

    from tessera.core.config import Config

    lines = ["config keys (TOML [section] key = value; any may be overridden with --section.key=value):"]
    for name, cls in typing.get_type_hints(Config).items():
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        lines += textwrap.wrap(f"[{name}] {keys}", 100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    import argparse

    stages = (("train", "pretrain a model on prepared shards"),
              ("sft", "supervised fine-tuning on instruction JSONL"),
              ("rm", "a reward model on preference pairs"), ("dpo", "DPO on preference pairs"),
              ("ppo", "PPO with a reward model or function"), ("grpo", "GRPO with a reward model or function"),
              ("clip", "CLIP contrastive image-text pretraining"),
              ("vlm", "an image-conditioned LM: stage 'align' (projector on captions) or 'instruct' (VQA)"))
    keys = config_keys()
    for stage, what in stages:
        st = sub.add_parser(stage, help=what, description=f"{what}: tessera {stage} CONFIG.toml --section.key=value ...",
                            epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter)
        st.add_argument("config", help="TOML config; any key may be overridden with --section.key=value")
        st.add_argument("--resume", help="'auto' or a checkpoint directory (same as --checkpoint.resume=...)")
        st.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints and history of an earlier run in train.run_dir")
        st.set_defaults(func=cmd_train, takes_overrides=True)
