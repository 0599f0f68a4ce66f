"""`tessera <command>`: the one command-line entry point.

Errors a user can fix (bad config, missing data, bad input) print one line and exit 2; a run
that diverges exits 1. `--debug` anywhere on the line shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from tessera.core.cli_prompting import add_prompting_parsers
from tessera.core.cli_train import EXIT_INTERRUPTED, TrainingInterrupted, cmd_rl, cmd_train
from tessera.core.config import ConfigError


class UsageError(Exception):
    """Bad command-line input, reported as one line with exit code 2."""


def cmd_tokenizer_train(args) -> None:
    from tessera.core.data.prepare import input_files, read_documents
    from tessera.core.tokenizer import train_bpe, train_char

    files = input_files(args.files)
    if args.kind == "char":
        tok = train_char(read_documents(files, args.text_field))
    else:
        if not args.vocab_size:
            raise UsageError("--vocab-size is required for --kind bpe")
        tok = train_bpe(read_documents(files, args.text_field), args.vocab_size)
    path = tok.save(args.out)
    print(f"wrote {path} ({args.kind}, vocab {tok.vocab_size}, hash {tok.hash[:12]})")


def cmd_data_prepare(args) -> None:
    from tessera.core.data import prepare
    from tessera.core.tokenizer import load_tokenizer

    manifest = prepare(args.input, load_tokenizer(args.tokenizer), args.out, args.val_fraction,
                       args.shard_tokens, args.sample_tokens, args.text_field)
    counts = ", ".join(f"{k}: {manifest.tokens(k):,} tokens in {len(v)} shards" for k, v in manifest.splits.items())
    print(f"wrote {args.out}/manifest.json ({counts})")


def cmd_generate(args) -> None:
    import torch

    from tessera.core.build import resolve_device
    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.generate import Sampling, generate
    from tessera.core.tokenizer import load_tokenizer
    from tessera.interop.quantize import load_for_inference

    ckpt = find_checkpoint(args.ckpt)
    model = load_for_inference(ckpt, resolve_device(args.device))
    tok = load_tokenizer(args.tokenizer or ckpt)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"tokenizer vocab {tok.vocab_size} exceeds the model's {model.cfg.vocab_size}")
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    for step in generate(model, [prompt], args.max_new_tokens, sampling, stop_ids=[tok.eos_id],
                         use_cache=not args.no_cache, pad_id=tok.pad_id, seed=args.seed):
        if step[0] is not None and step[0] != tok.eos_id:
            sys.stdout.write(tok.decode([step[0]]))
            sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval_perplexity(args) -> None:
    from tessera.core.build import resolve_device
    from tessera.core.checkpoint import find_checkpoint, load_model_from_checkpoint
    from tessera.core.data import read_manifest
    from tessera.core.evaluate import perplexity
    from tessera.core.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    ckpt = find_checkpoint(args.ckpt)
    model = load_model_from_checkpoint(ckpt, device)
    manifest = read_manifest(args.data, load_tokenizer(ckpt).hash)
    seq_len = args.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    print(json.dumps(perplexity(model, manifest, args.split, seq_len, args.batch_size, device)))


def cmd_eval_text(args) -> None:
    from tessera.core.evaluate import text_metrics

    preds = Path(args.pred).read_text(encoding="utf-8").splitlines()
    refs = Path(args.ref).read_text(encoding="utf-8").splitlines()
    print(json.dumps(text_metrics(preds, refs)))


def cmd_plan(args) -> None:
    from tessera.core.config import load_config
    from tessera.distributed.planner import Layout, format_table, plan, rank_layouts

    model = load_config(None, [f"--model.preset={json.dumps(args.model)}"]).model
    shape = (model, args.gpus, args.gpu_mem, args.seq, args.micro_batch)
    if args.dp_shard or args.dp_replicate > 1 or args.tp > 1:
        dp_shard = args.dp_shard or args.gpus // (args.dp_replicate * args.tp)
        layout = Layout(args.dp_replicate, dp_shard, args.tp, args.ac, args.ac_every, args.precision,
                        args.engine, args.zero_stage)
        print(format_table([plan(*shape, layout)]))
    else:
        fitting = rank_layouts(*shape, precision=args.precision, engine=args.engine, zero_stage=args.zero_stage)
        if not fitting:
            raise UsageError(f"no layout of {args.model} fits {args.gpus} GPUs of {args.gpu_mem} GiB at seq {args.seq}")
        print(format_table(fitting))


def cmd_plot(args) -> None:
    from tessera.core.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


def cmd_launch(args, overrides: list[str]) -> None:
    from tessera.launchers.launch import launch

    status = launch(args.config, overrides, dry_run=args.dry_run)
    if status:
        raise SystemExit(status)


def cmd_jobs(args) -> None:
    from tessera.launchers import jobs

    entry = jobs.find(args.job, args.dir)
    if args.action == "status":
        print(f"{entry.id} {entry.name} {entry.backend}: {jobs.status(entry)}")
    elif args.action == "logs":
        sys.stdout.write(jobs.logs(entry))
    else:
        jobs.cancel(entry)
        print(f"cancelled {entry.id} ({entry.name})")


def cmd_convert(args) -> None:
    from tessera.interop.hf import convert_from_hf, convert_to_hf

    if args.action == "from-hf":
        print(f"wrote Tessera checkpoint {convert_from_hf(args.src, args.out)}")
    else:
        print(f"wrote Hugging Face model {convert_to_hf(args.src, args.out, args.max_shard_size)}")


def cmd_export_onnx(args) -> None:
    from tessera.interop.onnx_export import export_onnx

    print(f"wrote {export_onnx(args.ckpt, args.out, args.opset)}")


def cmd_quantize(args) -> None:
    from tessera.interop.quantize import quantize_int8

    if not args.int8:
        raise UsageError("choose a quantization: --int8 (the only one so far)")
    print(f"wrote int8 checkpoint {quantize_int8(args.ckpt, args.out)}")


def cmd_serve(args) -> None:
    import os

    from tessera.interop.serve import ServeLimits, serve

    limits = ServeLimits(max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                         max_new_tokens=args.max_tokens)
    serve(args.ckpt, args.host, args.port, os.environ.get(args.api_key_env) or None, limits, args.device)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Train your own language models.")
    sub = p.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(dest="action", required=True)
    tt = tok.add_parser("train", help="train a character or byte-level BPE tokenizer")
    tt.add_argument("files", nargs="+", help=".txt/.jsonl files or directories")
    tt.add_argument("--kind", choices=["char", "bpe"], default="bpe")
    tt.add_argument("--vocab-size", type=int, default=0)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--out", required=True, help="directory for tokenizer.json")
    tt.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare data").add_subparsers(dest="action", required=True)
    dp = data.add_parser("prepare", help="tokenize text into WebDataset shards")
    dp.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or directories")
    dp.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    dp.add_argument("--out", required=True)
    dp.add_argument("--val-fraction", type=float, default=0.1)
    dp.add_argument("--shard-tokens", type=int, default=1 << 20)
    dp.add_argument("--sample-tokens", type=int, default=4096)
    dp.add_argument("--text-field", default="text")
    dp.set_defaults(func=cmd_data_prepare)

    tr = sub.add_parser("train", help="train a model: tessera train CONFIG.toml --section.key=value ...")
    tr.add_argument("config", help="TOML config")
    tr.add_argument("--resume", help="'auto' or a checkpoint directory (same as --checkpoint.resume=...)")
    tr.set_defaults(func=cmd_train, takes_overrides=True)
    for stage, what in (("sft", "supervised fine-tuning on instruction JSONL"),
                        ("rm", "a reward model on preference pairs"), ("dpo", "DPO on preference pairs")):
        st = sub.add_parser(stage, help=f"{what}: tessera {stage} CONFIG.toml --section.key=value ...")
        st.add_argument("config", help="TOML config (data.path: the JSONL file; model.init_from: the start)")
        st.add_argument("--resume", help="'auto' or a checkpoint directory")
        st.set_defaults(func=cmd_train, takes_overrides=True)
    for stage in ("ppo", "grpo"):
        st = sub.add_parser(stage, help=f"{stage.upper()} with a reward model or function: tessera {stage} "
                                        "CONFIG.toml --section.key=value ...")
        st.add_argument("config", help="TOML config (data.path: {\"prompt\": ...} lines; [rl]: reward and knobs)")
        st.add_argument("--resume", help="'auto' or a checkpoint directory")
        st.set_defaults(func=cmd_rl, takes_overrides=True)

    ge = sub.add_parser("generate", help="sample text from a checkpoint")
    ge.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    ge.add_argument("--prompt", default="")
    ge.add_argument("--max-new-tokens", type=int, default=200)
    ge.add_argument("--temperature", type=float, default=0.8)
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--seed", type=int)
    ge.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    ge.add_argument("--tokenizer", help="defaults to the checkpoint's own")
    ge.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ge.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate").add_subparsers(dest="action", required=True)
    ep = ev.add_parser("perplexity", help="perplexity of a checkpoint on prepared data")
    ep.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    ep.add_argument("--data", required=True)
    ep.add_argument("--split", default="val")
    ep.add_argument("--seq-len", type=int, default=0, help="default: the model's max_seq_len")
    ep.add_argument("--batch-size", type=int, default=8)
    ep.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ep.set_defaults(func=cmd_eval_perplexity)
    et = ev.add_parser("text", help="BLEU and ROUGE of predictions against references, line by line")
    et.add_argument("--pred", required=True)
    et.add_argument("--ref", required=True)
    et.set_defaults(func=cmd_eval_text)

    pn = sub.add_parser("plan", help="per-GPU memory and step time of parallel layouts (fitting ones, fastest first)")
    pn.add_argument("--model", required=True, help="a preset of configs/models/")
    pn.add_argument("--gpus", type=int, required=True)
    pn.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    pn.add_argument("--seq", type=int, required=True)
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

    pl = sub.add_parser("plot", help="plot a run's loss curves to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plot)

    la = sub.add_parser("launch", help="run a recipe from a launch config: here, with torchrun, or on SLURM")
    la.add_argument("config", help="launch TOML ([job], [parallel], [recipe]); --job.key=value and recipe overrides follow")
    la.add_argument("--dry-run", action="store_true", help="print what would be run or submitted")
    la.set_defaults(func=cmd_launch, takes_overrides=True)

    jo = sub.add_parser("jobs", help="status, logs or cancel of a launched job")
    jo.add_argument("action", choices=["status", "logs", "cancel"])
    jo.add_argument("job", help="a job id or a job name (its newest launch)")
    jo.add_argument("--dir", default="runs/jobs", help="the launch's job.output_dir (default runs/jobs)")
    jo.set_defaults(func=cmd_jobs)

    cv = sub.add_parser("convert", help="convert checkpoints").add_subparsers(dest="action", required=True)
    cf = cv.add_parser("from-hf", help="a Hugging Face Llama/GPT-2 directory -> a Tessera checkpoint")
    cf.add_argument("src", help="directory with config.json and safetensors weights")
    cf.add_argument("out")
    cf.set_defaults(func=cmd_convert)
    ct = cv.add_parser("to-hf", help="a Tessera checkpoint (or run directory) -> a Hugging Face directory")
    ct.add_argument("src", help="a checkpoint, or a run directory (its newest checkpoint)")
    ct.add_argument("out")
    ct.add_argument("--max-shard-size", default="5GB", help="split the weights into shards of at most this size")
    ct.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="export a checkpoint").add_subparsers(dest="action", required=True)
    eo = ex.add_parser("onnx", help="ONNX graph with dynamic batch and sequence axes, returning logits")
    eo.add_argument("ckpt")
    eo.add_argument("out", help="OUT.onnx")
    eo.add_argument("--opset", type=int, default=18)
    eo.set_defaults(func=cmd_export_onnx)

    qu = sub.add_parser("quantize", help="quantize a checkpoint's linear layers for CPU inference")
    qu.add_argument("ckpt")
    qu.add_argument("out")
    qu.add_argument("--int8", action="store_true", help="dynamic int8 (weights int8, activations quantized per batch)")
    qu.set_defaults(func=cmd_quantize)

    sv = sub.add_parser("serve", help="OpenAI-style HTTP completions server")
    sv.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-env", default="TESSERA_API_KEY", help="environment variable holding the API key (unset: no key)")
    sv.add_argument("--max-batch", type=int, default=32)
    sv.add_argument("--max-prompt-tokens", type=int, default=0, help="default: the model's context minus one")
    sv.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    sv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sv.set_defaults(func=cmd_serve)

    add_prompting_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # as a command: let `tessera ... | head` end quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args, extra = parser().parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    stray = [a for a in extra if a not in overrides]
    if stray or (overrides and not getattr(args, "takes_overrides", False)):
        print(f"tessera: error: unrecognized arguments: {' '.join(stray or overrides)}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, overrides)
        else:
            args.func(args)
    except Exception as e:
        if isinstance(e, TrainingInterrupted):
            print(f"tessera: training interrupted: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        status = _exit_status(e)
        if debug or status is None:
            raise
        print(f"tessera: {'training stopped' if status == 1 else 'error'}: {e}", file=sys.stderr)
        return status
    return 0


def _exit_status(error: Exception) -> int | None:
    """2 for errors a user can fix, 1 for a diverged run, None for a bug (shown with its traceback).
    The error types are imported here, not at start-up, so quick commands do not load torch."""
    from tessera.core.data import DataError
    from tessera.core.trainer import TrainingDiverged
    from tessera.kernels import KernelBackendError

    if isinstance(error, (ConfigError, DataError, UsageError, KernelBackendError, FileNotFoundError, ValueError)):
        return 2
    if isinstance(error, TrainingDiverged):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
