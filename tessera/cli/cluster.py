"""`tessera plan | launch | jobs`: size a layout, run a recipe here, under torchrun or on SLURM, and
follow the jobs it started."""
from __future__ import annotations

import json
import sys

from tessera.cli.errors import UsageError


def cmd_plan(args, overrides: list[str]) -> None:
    from tessera.distributed.planner import Layout, format_table, hardware, plan, rank_layouts

    if args.config:
        model, seq, micro_batch, vision = config_shape(args, overrides)
    elif not args.model:
        raise UsageError("give --model PRESET or --config CONFIG.toml")
    elif overrides:
        raise UsageError(f"{overrides[0]}: --section.key=value overrides go with --config")
    else:
        (model, seq), micro_batch, vision = plan_shape(args), args.micro_batch or 1, None
    hw = hardware(args.gpu, args.mfu, args.intra_bw, args.inter_bw)
    memory = args.gpu_mem or hw.mem_gb
    shape = (model, args.gpus, memory, seq, micro_batch)
    print(hw.describe())
    if args.dp_shard or args.dp_replicate > 1 or args.tp > 1:
        dp_shard = args.dp_shard or args.gpus // (args.dp_replicate * args.tp)
        layout = Layout(args.dp_replicate, dp_shard, args.tp, args.ac, args.ac_every, args.precision,
                        args.engine, args.zero_stage)
        estimates = [plan(*shape, layout, hw, vision=vision)]
    else:
        estimates = rank_layouts(*shape, hw=hw, precision=args.precision, engine=args.engine,
                                 zero_stage=args.zero_stage, vision=vision)
        if not estimates:
            raise UsageError(f"no layout of {args.model or args.config} fits {args.gpus} GPUs of {memory:g} GiB "
                             f"at seq {seq}")
    print(format_table(estimates))
    for note in dict.fromkeys(n for e in estimates for n in e.notes):
        print(f"note: {note}")


def config_shape(args, overrides: list[str]):
    """(model, text positions, micro-batch, image side) of a `tessera train | vlm | clip` config:
    train.seq_len (--seq replaces it) and train.batch_size (unless --micro-batch); a [vlm] or
    [clip] section adds the image side. With prefix fusion train.seq_len holds the image tokens
    too, as `tessera vlm` packs a row."""
    import dataclasses
    from pathlib import Path

    from tessera.cli.train import _init_from
    from tessera.core.config import load_config, parse_override, read_toml
    from tessera.distributed.vision_plan import Vision

    if args.model or args.seq_len_schedule:
        raise UsageError("--config sizes the config's own model and train.seq_len: drop --model and "
                         "--seq-len-schedule (--seq, --micro-batch and --section.key=value overrides apply)")
    cfg, _ = _init_from(load_config(args.config, [*overrides, *([f"--train.seq_len={args.seq}"] if args.seq else [])]))
    if cfg.model.vocab_size == 0:
        if not cfg.data.tokenizer:
            raise UsageError(f"model.vocab_size is 0 in {args.config} (the tokenizer's): give --model.vocab_size=N "
                             "or --data.tokenizer=PATH")
        from tessera.core.tokenizer import load_tokenizer

        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vocab_size=load_tokenizer(cfg.data.tokenizer).vocab_size))
    sections = set(read_toml(Path(args.config))) | {parse_override(o)[0][0] for o in overrides}
    kind = [k for k in ("vlm", "clip") if k in sections]
    seq, micro_batch = cfg.train.seq_len, args.micro_batch or cfg.train.batch_size
    if len(kind) > 1:
        raise UsageError(f"{args.config} has both [vlm] and [clip]: a config is one run's")
    if kind and cfg.vision.init_from:
        from tessera.multimodal.clip_task import clip_config

        cfg = clip_config(cfg)  # the architecture of the tower it names
    command = kind[0] if kind else "train"
    vision = Vision.of(cfg, command)
    what = f"{command}{' ' + cfg.vlm.fusion if command == 'vlm' else ''}"
    if vision:
        what += f": {vision.images} image(s) of {cfg.vision.num_tokens} tokens per sample"
    if vision and vision.prefix_tokens:
        if seq <= vision.prefix_tokens:
            raise UsageError(f"train.seq_len={seq} leaves no room for text after {vision.prefix_tokens} image tokens")
        seq -= vision.prefix_tokens
        what += f", seq {cfg.train.seq_len} = {seq} text + {vision.prefix_tokens} image positions"
    else:
        what += f"{',' if vision else ':'} seq {seq}"
    frozen = f"; frozen: {', '.join(vision.frozen)}" if vision and vision.frozen else ""
    print(f"{what}, micro-batch {micro_batch}{frozen}")
    return cfg.model, seq, micro_batch, vision


def plan_shape(args):
    """The preset's model and the sequence length to size for: --seq, or the longest length of
    --seq-len-schedule (a progressive schedule peaks in memory at its longest phase)."""
    from tessera.core.config import TrainConfig, build_section, load_config, parse_override

    preset = f"--model.preset={json.dumps(args.model)}"
    if not args.seq_len_schedule:
        if not args.seq:
            raise UsageError("give --seq or --seq-len-schedule")
        return load_config(None, [preset]).model, args.seq
    _, schedule = parse_override(f"--s={args.seq_len_schedule}")
    longest = max(build_section(TrainConfig, {"seq_len_schedule": schedule}, "train").seq_lens)
    if args.seq and args.seq != longest:
        raise UsageError(f"--seq {args.seq} differs from the longest length of --seq-len-schedule ({longest}); give one")
    cfg = load_config(None, [preset, f"--train.seq_len_schedule={args.seq_len_schedule}", f"--train.seq_len={longest}"])
    print(f"seq_len_schedule {[list(p) for p in cfg.train.seq_len_schedule]}: memory sized for its longest "
          f"length, {longest} (step times below are those of that phase)")
    return cfg.model, longest


def cmd_launch(args, overrides: list[str]) -> None:
    from tessera.launchers.launch import launch

    status = launch(args.config, overrides, dry_run=args.dry_run)
    if status:
        raise SystemExit(status)


def cmd_jobs(args) -> None:
    from tessera.launchers import jobs

    if args.action == "list":
        for e in jobs.entries(args.dir):
            print(f"{e.id}\t{e.name}\t{e.backend}\t{e.submitted}\t{jobs.status(e)}")
        return
    if not args.job:
        raise UsageError(f"tessera jobs {args.action} needs a JOB (an id or a name; `tessera jobs list` shows them)")
    entry = jobs.find(args.job, args.dir)
    if args.action == "logs" and args.follow:
        for text in jobs.follow(entry):
            sys.stdout.write(text)
            sys.stdout.flush()
    elif args.action == "status":
        print(f"{entry.id} {entry.name} {entry.backend}: {jobs.status(entry)}")
    elif args.action == "logs":
        sys.stdout.write(jobs.logs(entry))
    else:
        jobs.cancel(entry)
        print(f"cancelled {entry.id} ({entry.name})")


def add_parsers(sub) -> None:
    pn = sub.add_parser("plan", help="per-GPU memory and step time of parallel layouts (fitting ones, fastest first)",
                        description="Per-GPU memory and step time of parallel layouts, fitting ones fastest first, for "
                                    "a model preset (--model, --seq) or a `tessera train | vlm | clip` config "
                                    "(--config: its model, train.seq_len and train.batch_size; [vlm] or [clip] adds "
                                    "the image side: the vision tower, projector and cross-attention layers, "
                                    "replicated under TP, and prefix fusion's image tokens in the decoder's sequence). "
                                    "--section.key=value overrides follow --config; model.vocab_size 0 is read "
                                    "from data.tokenizer.")
    pn.add_argument("--model", default="", help="a preset of configs/models/ (or give --config)")
    pn.add_argument("--config", default="", metavar="TOML",
                    help="a tessera train | vlm | clip config; --seq and --micro-batch replace its train values")
    pn.add_argument("--gpus", type=int, required=True)
    pn.add_argument("--gpu", choices=["h100", "h200", "a100"], default="h100", help="peak TFLOP/s, memory, bandwidths")
    pn.add_argument("--gpu-mem", type=float, default=0.0, help="GiB per GPU (default: the GPU's)")
    pn.add_argument("--mfu", type=float, default=0.0, help="model FLOPs utilisation (default: 0.40)")
    pn.add_argument("--intra-bw", type=float, default=0.0, help="GB/s per GPU within a node (default: the GPU's)")
    pn.add_argument("--inter-bw", type=float, default=0.0, help="GB/s per GPU between nodes (default: the GPU's)")
    pn.add_argument("--seq", type=int, default=0, help="sequence length (or give --seq-len-schedule); with --config "
                    "it replaces train.seq_len, which holds prefix fusion's image tokens too")
    pn.add_argument("--seq-len-schedule", default="", metavar="TOML",
                    help="progressive length, e.g. '[[0, 128], [1000, 256]]': sized for its longest length")
    pn.add_argument("--micro-batch", type=int, default=0, help="default: train.batch_size with --config, else 1")
    pn.add_argument("--dp-shard", type=int, default=0, help="with --dp-replicate/--tp: plan this one layout")
    pn.add_argument("--dp-replicate", type=int, default=1)
    pn.add_argument("--tp", type=int, default=1)
    pn.add_argument("--ac", choices=["none", "full", "selective", "op"], default="none")
    pn.add_argument("--ac-every", type=int, default=2)
    pn.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    pn.add_argument("--engine", choices=["fsdp", "deepspeed"], default="fsdp")
    pn.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=3)
    pn.set_defaults(func=cmd_plan, takes_overrides=True)

    la = sub.add_parser("launch", help="run a recipe from a launch config: here, with torchrun, or on SLURM")
    la.add_argument("config", help="launch TOML ([job], [parallel], [recipe]); --job.key=value and recipe overrides follow")
    la.add_argument("--dry-run", action="store_true", help="print what would be run or submitted")
    la.set_defaults(func=cmd_launch, takes_overrides=True)

    jo = sub.add_parser("jobs", help="list launched jobs; status, logs or cancel of one")
    jo.add_argument("action", choices=["list", "status", "logs", "cancel"])
    jo.add_argument("job", nargs="?", help="a job id or a job name (its newest launch)")
    jo.add_argument("--follow", action="store_true", help="logs: print the console log as it grows until the job ends")
    jo.add_argument("--dir", default="runs/jobs", help="the launch's job.output_dir (default runs/jobs)")
    jo.set_defaults(func=cmd_jobs)
