"""Decoding speed with and without the KV cache, on the same model and prompts.

    python benchmarks/generate_throughput.py [--ckpt RUN_OR_CKPT] [--new-tokens 256] [--batch 1 8]

With no checkpoint, a randomly initialised model of the Shakespeare recipe's shape is used
(decoding speed does not depend on the weights). Greedy decoding; the two paths must agree
token for token, which the script checks before it reports.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera.core.checkpoint import load_model_from_checkpoint  # noqa: E402
from tessera.core.config import load_config  # noqa: E402
from tessera.core.generate import Sampling, generate_tokens  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402


def build_model(ckpt: str | None, max_seq_len: int) -> Transformer:
    if ckpt:
        return load_model_from_checkpoint(ckpt)
    cfg = load_config(ROOT / "configs" / "recipes" / "shakespeare" / "train.toml",
                      ["--model.vocab_size=69", f"--model.max_seq_len={max_seq_len}"])
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


def timed(model, prompts, new_tokens, use_cache) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = generate_tokens(model, prompts, new_tokens, sampling=Sampling(temperature=0), use_cache=use_cache)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=512, help="context of the random model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    model = build_model(args.ckpt, args.max_seq_len)
    if args.prompt_len + args.new_tokens > model.cfg.max_seq_len:
        ap.error(f"prompt + new tokens exceed the model's context of {model.cfg.max_seq_len}")
    rows = []
    print("| batch | cached tokens/s | uncached tokens/s | speedup |\n|---|---|---|---|")
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        timed(model, prompts, 4, True)  # warm-up
        t_cached, cached = timed(model, prompts, args.new_tokens, True)
        t_plain, plain = timed(model, prompts, args.new_tokens, False)
        if cached != plain:
            raise SystemExit("cached and uncached greedy decoding disagree")
        n = batch * args.new_tokens
        row = {"batch": batch, "cached_tokens_per_s": n / t_cached, "uncached_tokens_per_s": n / t_plain}
        rows.append(row)
        print(f"| {batch} | {row['cached_tokens_per_s']:,.0f} | {row['uncached_tokens_per_s']:,.0f} | "
              f"{t_plain / t_cached:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
            "model": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "max_seq_len": model.cfg.max_seq_len}}
    (out / "generate_throughput.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
