"""`tessera generate | eval | plot`: sample from a checkpoint, measure it, and draw a run's curves."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tessera.cli.errors import UsageError

DEVICES = ["auto", "cpu", "cuda"]


def cmd_generate(args) -> None:
    import torch

    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.generate import Sampling, generate
    from tessera.core.placement import resolve_device
    from tessera.core.text_stream import TextStream
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
    stream, special = TextStream(tok, []), {tok.bos_id, tok.eos_id, tok.pad_id}
    sys.stdout.write(args.prompt)
    for step in generate(model, [prompt], args.max_new_tokens, sampling, stop_ids=[tok.eos_id],
                         use_cache=not args.no_cache, pad_id=tok.pad_id, seed=args.seed):
        if step[0] is not None and step[0] not in special:  # a multi-byte character prints once it is whole
            sys.stdout.write(stream.push(step[0])[0])
            sys.stdout.flush()
    sys.stdout.write(stream.finish() + "\n")


def cmd_eval_perplexity(args) -> None:
    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.data import read_manifest
    from tessera.core.evaluate import perplexity
    from tessera.core.placement import resolve_device
    from tessera.core.tokenizer import load_tokenizer
    from tessera.interop.quantize import is_quantized, load_for_inference

    ckpt = find_checkpoint(args.ckpt)
    device = resolve_device("cpu" if is_quantized(ckpt) and args.device == "auto" else args.device)
    model = load_for_inference(ckpt, device)  # int8 checkpoints too (on the CPU)
    manifest = read_manifest(args.data, load_tokenizer(ckpt).hash)
    seq_len = args.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if args.max_batches < 0:
        raise UsageError(f"--max-batches {args.max_batches} must be >= 0 (0: the whole split)")
    print(json.dumps(perplexity(model, manifest, args.split, seq_len, args.batch_size, device, args.max_batches,
                                progress=True)))


def cmd_eval_text(args) -> None:
    from tessera.core.evaluate import text_metrics

    preds = Path(args.pred).read_text(encoding="utf-8").splitlines()
    refs = Path(args.ref).read_text(encoding="utf-8").splitlines()
    print(json.dumps(text_metrics(preds, refs)))


def cmd_plot(args) -> None:
    from tessera.core.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


def add_parsers(sub) -> None:
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
    ge.add_argument("--device", default="auto", choices=DEVICES)
    ge.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="perplexity on prepared data; BLEU and ROUGE of text"
                        ).add_subparsers(dest="action", required=True)
    ep = ev.add_parser("perplexity", help="perplexity of a checkpoint on prepared data")
    ep.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    ep.add_argument("--data", required=True)
    ep.add_argument("--split", default="val")
    ep.add_argument("--seq-len", type=int, default=0, help="default: the model's max_seq_len")
    ep.add_argument("--batch-size", type=int, default=8)
    ep.add_argument("--max-batches", type=int, default=0, help="evaluate the first N batches only (default 0: all)")
    ep.add_argument("--device", default="auto", choices=DEVICES)
    ep.set_defaults(func=cmd_eval_perplexity)
    et = ev.add_parser("text", help="BLEU and ROUGE of predictions against references, line by line")
    et.add_argument("--pred", required=True)
    et.add_argument("--ref", required=True)
    et.set_defaults(func=cmd_eval_text)

    pl = sub.add_parser("plot", help="plot a run's loss curves to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plot)
