"""`tessera plan | launch | jobs`: size a layout, run a recipe here, under torchrun or on SLURM, and
follow the jobs it started."""
from __future__ import annotations

import json
import sys

from tessera.cli.errors import UsageError


def cmd_plan(args) -> None:
    from tessera.core.config import load_config
    from tessera.distributed.planner import Layout, format_table, hardware, plan, rank_layouts

    model, seq = plan_shape(args)
    hw = hardware(args.gpu, args.mfu, args.intra_bw, args.inter_bw)
    memory = args.gpu_mem or hw.mem_gb
    shape = (model, args.gpus, memory, seq, args.micro_batch)
    print(hw.describe())
    if args.dp_shard or args.dp_replicate > 1 or args.tp > 1:
        dp_shard = args.dp_shard or args.gpus // (args.dp_replicate * args.tp)
        layout = Layout(args.dp_replicate, dp_shard, args.tp, args.ac, args.ac_every, args.precision,
                        args.engine, args.zero_stage)
        print(format_table([plan(*shape, layout, hw)]))
    else:
        fitting = rank_layouts(*shape, hw=hw, precision=args.precision, engine=args.engine, zero_stage=args.zero_stage)
        if not fitting:
            raise UsageError(f"no layout of {args.model} fits {args.gpus} GPUs of {memory:g} GiB at seq {seq}")
        print(format_table(fitting))


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
    pn = sub.add_parser("plan", help="per-GPU memory and step time of parallel layouts (fitting ones, fastest first)")
    pn.add_argument("--model", required=True, help="a preset of configs/models/")
    pn.add_argument("--gpus", type=int, required=True)
    pn.add_argument("--gpu", choices=["h100", "h200", "a100"], default="h100", help="peak TFLOP/s, memory, bandwidths")
    pn.add_argument("--gpu-mem", type=float, default=0.0, help="GiB per GPU (default: the GPU's)")
    pn.add_argument("--mfu", type=float, default=0.0, help="model FLOPs utilisation (default: 0.40)")
    pn.add_argument("--intra-bw", type=float, default=0.0, help="GB/s per GPU within a node (default: the GPU's)")
    pn.add_argument("--inter-bw", type=float, default=0.0, help="GB/s per GPU between nodes (default: the GPU's)")
    pn.add_argument("--seq", type=int, default=0, help="sequence length (or give --seq-len-schedule)")
    pn.add_argument("--seq-len-schedule", default="", metavar="TOML",
                    help="progressive length, e.g. '[[0, 128], [1000, 256]]': sized for its longest length")
    pn.add_argument("--micro-batch", type=int, default=1)
    pn.add_argument("--dp-shard", type=int, default=0, help="with --dp-replicate/--tp: plan this one layout")
    pn.add_argument("--dp-replicate", type=int, default=1)
    pn.add_argument("--tp", type=int, default=1)
    pn.add_argument("--ac", choices=["none", "full", "selective", "op"], default="none")
    pn.add_argument("--ac-every", type=int, default=2)
    pn.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    pn.add_argument("--engine", choices=["fsdp", "deepspeed"], default="fsdp")
    pn.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=3)
    pn.set_defaults(func=cmd_plan)

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
