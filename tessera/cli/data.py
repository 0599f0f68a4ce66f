"""`tessera tokenizer train` and `tessera data prepare`: text in, a tokenizer and WebDataset shards out;
`tessera data prepare-images | synth-scenes | digits`: images and their texts (tessera.multimodal)."""
from __future__ import annotations

import sys

from tessera.cli.errors import UsageError


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
                       args.shard_tokens, args.sample_tokens, args.text_field, args.val_input)
    counts = ", ".join(f"{k}: {manifest.tokens(k):,} tokens in {len(v)} shards" for k, v in manifest.splits.items())
    read = ", ".join(manifest.sources[:5]) + (f" and {len(manifest.sources) - 5} more" if len(manifest.sources) > 5 else "")
    print(f"read {len(manifest.sources)} files: {read}")
    if manifest.unknown_tokens:
        print(f"warning: {manifest.unknown_tokens} tokens of input are the tokenizer's unknown token "
              f"(characters it has never seen, such as {manifest.unknown_chars!r})", file=sys.stderr)
    print(f"wrote {args.out}/manifest.json ({counts})")


def cmd_prepare_images(args) -> None:
    from tessera.multimodal.image_shards import prepare_images

    m = prepare_images(args.images, args.captions, args.out, args.val_fraction, args.shard_samples, args.on_error)
    counts = ", ".join(f"{k}: {m.samples(k):,} images in {len(v)} shards" for k, v in m.splits.items())
    if m.skipped:
        print(f"warning: skipped {m.skipped} unusable image(s), listed in the manifest", file=sys.stderr)
    print(f"wrote {args.out}/manifest.json ({m.kind}; {counts}; {m.texts:,} texts)")


def cmd_synth_scenes(args) -> None:
    from tessera.multimodal.scenes import synth_scenes

    out = synth_scenes(args.out, args.n, args.size, args.seed)
    print(f"wrote {args.n} scenes to {out}/images with captions.jsonl, vqa.jsonl and scenes.jsonl")


def cmd_digits(args) -> None:
    from tessera.multimodal.digits import write_digits

    out = write_digits(args.out, args.size)
    print(f"wrote the scikit-learn digits to {out}/images with captions.jsonl and vqa.jsonl")


def add_parsers(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a character or byte-level BPE tokenizer"
                         ).add_subparsers(dest="action", required=True)
    tt = tok.add_parser("train", help="train a character or byte-level BPE tokenizer")
    tt.add_argument("files", nargs="+", help=".txt/.jsonl files or directories")
    tt.add_argument("--kind", choices=["char", "bpe"], default="bpe")
    tt.add_argument("--vocab-size", type=int, default=0)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--out", required=True, help="directory for tokenizer.json")
    tt.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare text or image data as WebDataset shards").add_subparsers(dest="action",
                                                                                          required=True)
    dp = data.add_parser("prepare", help="tokenize text into WebDataset shards")
    dp.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or directories")
    dp.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    dp.add_argument("--out", required=True)
    dp.add_argument("--val-fraction", type=float, default=0.1, help="the last share of the token stream that validates")
    dp.add_argument("--val-input", nargs="+", help="files or directories that are the val split instead (a split by file)")
    dp.add_argument("--shard-tokens", type=int, default=0,
                    help="tokens per shard (default 0: sized so every split has at least 8 shards, at most 2^20 tokens each)")
    dp.add_argument("--sample-tokens", type=int, default=4096)
    dp.add_argument("--text-field", default="text")
    dp.set_defaults(func=cmd_data_prepare)

    pi = data.add_parser("prepare-images", help="images + captions or question/answer JSONL/CSV into WebDataset shards")
    pi.add_argument("--images", required=True, help="directory the table's image paths are relative to")
    pi.add_argument("--captions", required=True,
                    help='.jsonl or .csv rows {"image", "caption"} or {"image", "question", "answer"}; '
                         'a JSONL caption row may list "negatives" (hard-negative captions, for clip.negatives)')
    pi.add_argument("--out", required=True)
    pi.add_argument("--val-fraction", type=float, default=0.1, help="share of the images held out (by path hash)")
    pi.add_argument("--shard-samples", type=int, default=0,
                    help="images per shard (default 0: sized so every split has at least 8 shards, at most 1000 each)")
    pi.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                    help="an unusable image: stop naming it, or skip it and count it in the manifest")
    pi.set_defaults(func=cmd_prepare_images)

    ss = data.add_parser("synth-scenes", help="procedural images of coloured shapes with exact captions and Q/A")
    ss.add_argument("--out", required=True)
    ss.add_argument("--n", type=int, required=True, help="number of scenes")
    ss.add_argument("--size", type=int, default=64, help="image side in pixels")
    ss.add_argument("--seed", type=int, default=0, help="same seed, same scenes; a held-out set is another seed")
    ss.set_defaults(func=cmd_synth_scenes)

    dg = data.add_parser("digits", help="scikit-learn's bundled handwritten digits as PNGs with captions and Q/A")
    dg.add_argument("--out", required=True)
    dg.add_argument("--size", type=int, default=32, help="image side in pixels, a multiple of 8")
    dg.set_defaults(func=cmd_digits)
