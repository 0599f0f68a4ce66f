"""`tessera generate | eval | plot`: sample from a checkpoint (with images for a `tessera vlm` one), measure it
(perplexity, text, captions, VQA), and draw a run's curves."""
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
    if args.image:
        return _generate_with_images(args, ckpt)
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


def _generate_with_images(args, ckpt) -> None:
    """`--image FILE` (one per `<image>` marker; a prompt without one gets the marker first)."""
    import torch

    from tessera.core.generate import Sampling
    from tessera.core.placement import resolve_device
    from tessera.core.tokenizer import load_tokenizer
    from tessera.multimodal.text_tokens import IMAGE_MARKER
    from tessera.multimodal.vlm_inference import generate_with_images, image_pixels, load_vlm

    model, cfg = load_vlm(ckpt, resolve_device(args.device))
    tok = load_tokenizer(args.tokenizer or ckpt)
    prompt = args.prompt if IMAGE_MARKER in args.prompt else IMAGE_MARKER * len(args.image) + args.prompt
    pixels = []
    for path in args.image:
        if not Path(path).is_file():
            raise UsageError(f"--image {path}: no such file")
        pixels.append(image_pixels(Path(path).read_bytes(), path, cfg))
    out = []
    for step in generate_with_images(model, tok, [prompt], [torch.stack(pixels)], args.max_new_tokens,
                                     Sampling(args.temperature, args.top_k, args.top_p), not args.no_cache, args.seed):
        if step[0] is not None and step[0] not in (tok.eos_id, tok.pad_id, tok.bos_id):
            out.append(step[0])
    print(tok.decode(out))


def _vlm_scores(args, scores) -> None:
    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.placement import resolve_device
    from tessera.core.tokenizer import load_tokenizer
    from tessera.multimodal.vlm_inference import load_vlm

    ckpt = find_checkpoint(args.ckpt)
    model, cfg = load_vlm(ckpt, resolve_device(args.device))
    print(json.dumps(scores(model, cfg, load_tokenizer(ckpt), args.data, args.batch_size, args.max_images)))


def cmd_eval_captions(args) -> None:
    from tessera.multimodal.vlm_eval import caption_scores

    _vlm_scores(args, caption_scores)


def cmd_eval_vqa(args) -> None:
    from tessera.multimodal.vlm_eval import vqa_scores

    _vlm_scores(args, vqa_scores)


def cmd_eval_retrieval(args) -> None:
    from tessera.core.placement import resolve_device
    from tessera.multimodal.clip_eval import retrieval_scores

    print(json.dumps(retrieval_scores(args.ckpt, args.data, args.batch_size, resolve_device(args.device))))


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
    ge.add_argument("--image", action="append", default=[],
                    help="an image for a tessera vlm checkpoint (repeatable: one per <image> in the prompt)")
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

    for what, func, table in (("captions", cmd_eval_captions, "captions.jsonl: exact match, CIDEr-D, BLEU, ROUGE"),
                              ("vqa", cmd_eval_vqa, "vqa.jsonl: answer accuracy (exact match)")):
        ei = ev.add_parser(what, help=f"a tessera vlm checkpoint on a folder of images and {table}")
        ei.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
        ei.add_argument("--data", required=True, help="a folder with images/ (as tessera data synth-scenes writes)")
        ei.add_argument("--batch-size", type=int, default=16)
        ei.add_argument("--max-images", type=int, default=0, help="the first N images only (default 0: all)")
        ei.add_argument("--device", default="auto", choices=DEVICES)
        ei.set_defaults(func=func)

    er = ev.add_parser("retrieval", help="image<->text Recall@1/5/10 of a tessera clip checkpoint on a folder")
    er.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    er.add_argument("--data", required=True, help="a folder with captions.jsonl and images/")
    er.add_argument("--batch-size", type=int, default=64)
    er.add_argument("--device", default="auto", choices=DEVICES)
    er.set_defaults(func=cmd_eval_retrieval)

    pl = sub.add_parser("plot", help="plot a run's loss curves to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plot)
