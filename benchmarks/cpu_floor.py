"""The matmul floor of one training step of the recipe on this CPU: the time its matrix products
alone take at the speed this machine's BLAS reaches on exactly those shapes, fp32 and bf16.

Any implementation of the same step (same model, batch, context) does these products; what a
framework adds (elementwise work, softmax, the optimizer, Python) comes on top. The floor says how
far a speed target is from the hardware: a target above the floor's tokens/s cannot be met on
this CPU by any schedule of the same work.

    python benchmarks/cpu_floor.py                # both blocks, fp32 and bf16, torch's thread count
    python benchmarks/cpu_floor.py --eager-tokens-per-s 17328   # also: the floor against that reference
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recipe_speed import GPT2_BLOCKS, cpu_description  # noqa: E402
from benchmarks.train_throughput import DATA, ensure_data  # noqa: E402
from tessera.core.config import Config, load_config  # noqa: E402

RECIPE = ROOT / "configs" / "recipes" / "shakespeare" / "train.toml"


def recipe_config(blocks: str, vocab_size: int) -> Config:
    """The recipe's config, with nanoGPT's blocks for "gpt2" (as benchmarks/recipe_speed.py runs them)."""
    return load_config(RECIPE, [*(GPT2_BLOCKS if blocks == "gpt2" else []), f"--model.vocab_size={vocab_size}"])


def step_products(cfg: Config) -> list[tuple[int, ...]]:
    """(batch, m, k, n) of every product of one forward + backward: each linear's forward, input gradient
    and weight gradient; attention's scores and weighted values with their gradients; the LM head."""
    m, t = cfg.model, cfg.train
    tokens, d, d_ff = t.batch_size * t.seq_len, m.d_model, m.ffn_dim
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    mlp_in = [(d, d_ff)] * (2 if m.mlp == "swiglu" else 1)  # SwiGLU: gate and up
    linears = [(d, q), (d, kv), (d, kv), (q, d), *mlp_in, (d_ff, d)]  # q, k, v, o; MLP in; MLP out
    products = []
    for fan_in, fan_out in linears * m.n_layers + [(d, m.vocab_size)]:
        products += [(1, tokens, fan_in, fan_out), (1, tokens, fan_out, fan_in), (1, fan_out, tokens, fan_in)]
    bh, s, hd = t.batch_size * m.n_heads, t.seq_len, m.head_dim
    attention = [(bh, s, hd, s), (bh, s, s, hd),  # scores, probs @ v
                 (bh, s, s, hd), (bh, s, hd, s),  # d(probs) = dy @ v^T, d(v) = probs^T @ dy
                 (bh, s, s, hd), (bh, hd, s, s)]  # d(q) = d(scores) @ k, d(k) = d(scores)^T @ q
    return products + attention * m.n_layers


def median_seconds(fn, repeats: int, warmup: int = 5) -> float:
    """Median wall time of one call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds(shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> float:
    """Median time of one product of `shape` in `dtype`."""
    b, m, k, n = shape
    x, y = torch.randn(b, m, k, dtype=dtype), torch.randn(b, k, n, dtype=dtype)
    out = torch.empty(b, m, n, dtype=dtype)
    product = (lambda: torch.bmm(x, y, out=out)) if b > 1 else (lambda: torch.mm(x[0], y[0], out=out[0]))
    return median_seconds(product, repeats)


def floor(blocks: str, cfg: Config, dtype: torch.dtype, repeats: int) -> dict:
    products = step_products(cfg)
    ms = 1000 * sum(seconds(p, dtype, repeats) for p in products)
    flops = sum(2 * b * m * k * n for b, m, k, n in products)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return {"blocks": blocks, "dtype": str(dtype).removeprefix("torch."), "products": len(products),
            "gflop_per_step": flops / 1e9, "matmul_ms_per_step": ms, "gflop_per_s": flops / ms / 1e6,
            "floor_tokens_per_s": tokens / ms * 1000, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--eager-tokens-per-s", type=float, default=0.0, help="the strong eager loop's, for the ratios")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    ensure_data()  # the recipe's prepared Tiny Shakespeare: its vocabulary sizes the LM head
    from tessera.core.data import read_manifest

    vocab = read_manifest(DATA).vocab_size
    cpu = cpu_description()
    rows = [{**floor(blocks, recipe_config(blocks, vocab), dtype, args.repeats), "cpu": cpu}
            for blocks in ("llama", "gpt2") for dtype in (torch.float32, torch.bfloat16)]
    for row in rows:
        print(json.dumps(row))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cpu_floor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\nCPU: {cpu}; {rows[0]['threads']} threads\n")
    ref = args.eager_tokens_per_s
    print("| blocks | dtype | GFLOP/step | matmul ms/step | GFLOP/s | floor tokens/s |" + (" floor vs eager loop |" if ref else ""))
    print("|---|---|---|---|---|---|" + ("---|" if ref else ""))
    for r in rows:
        print(f"| {r['blocks']} | {r['dtype']} | {r['gflop_per_step']:.2f} | {r['matmul_ms_per_step']:.1f} | "
              f"{r['gflop_per_s']:.0f} | {r['floor_tokens_per_s']:,.0f} |" + (f" {r['floor_tokens_per_s'] / ref:.2f}x |" if ref else ""))


if __name__ == "__main__":
    main()
