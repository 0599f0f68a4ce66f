"""One transformer block of the recipe, forward and backward, as the trainer runs it, against the
step a speed target allows.

A step of the recipe is `n_layers` blocks plus what surrounds them (embedding, LM head and loss,
clipping, the optimizer, the data). One block timed alone (a random input of the recipe's shape, a
random output gradient, the engine's autocast, gradients cleared as the trainer clears them) says how
much of the step the blocks take whatever the rest costs; with the eager loop's tokens/s, whether a
target of "N x the eager loop" fits at all. Also timed: a compiled region with almost nothing in it
(one elementwise product), forward and backward, against the same in eager: what entering and
leaving compiled code costs a block.

    python benchmarks/block_step.py --eager-tokens-per-s 27539      # the recipe as "auto" resolves it here
    python benchmarks/block_step.py --train.precision=fp32 --train.compile=false
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_floor import median_seconds  # noqa: E402
from benchmarks.recipe_speed import cpu_description  # noqa: E402
from benchmarks.train_throughput import ensure_data  # noqa: E402
from tessera.core.build import build_trainer  # noqa: E402
from tessera.core.config import load_config  # noqa: E402
from tessera.core.speed import compile_blocks  # noqa: E402

RECIPE = ROOT / "configs" / "recipes" / "shakespeare" / "train.toml"
WARMUP = 10


class Scale(nn.Module):
    """The smallest region worth compiling: x times a learned vector."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.weight


def median_ms(fn, repeats: int) -> float:
    return 1000 * median_seconds(fn, repeats, WARMUP)


def region_cost_ms(width: int, compiled: bool, repeats: int) -> float:
    """Forward + backward of `Scale` compiled as the blocks are, minus the same in eager."""
    x = torch.randn(width, requires_grad=True)

    def step(module):
        def run():
            module(x).sum().backward()
            x.grad = None
            module.zero_grad(set_to_none=True)
        return run

    eager = median_ms(step(Scale(width)), repeats)
    if not compiled:
        return 0.0
    tree = nn.Sequential(Scale(width))
    compile_blocks(tree, Scale)
    return median_ms(step(tree), repeats) - eager


def block_row(extra: list[str], repeats: int, steps: int, run_dir: Path) -> dict:
    cfg = load_config(RECIPE, [f"--train.run_dir={json.dumps(str(run_dir))}", "--log.progress=false",
                               "--checkpoint.every=0", "--eval.every=0", *extra])  # the recipe's length: "auto" as it resolves
    cfg, trainer = build_trainer(cfg)
    trainer.fit(stop_at=WARMUP)  # compilation and allocator warm-up
    start = time.perf_counter()
    trainer.fit(stop_at=WARMUP + 1 + steps)
    step_ms = 1000 * (time.perf_counter() - start) / (steps + 1)
    engine, model = trainer.engine, trainer.engine.model
    block = model.layers[0]
    b, s, d = cfg.train.batch_size, cfg.train.seq_len, cfg.model.d_model
    x = torch.randn(b, s, d, requires_grad=True)
    grad = torch.randn(b, s, d)
    rope = model.rope_window(0, s, x.device) if model.pos_emb is None else None
    outputs = []

    def forward():
        with engine.autocast():
            outputs.append(block(x, rope=rope, doc_ids=None, key_padding_mask=None, cache=None, layer=0))

    def backward():
        outputs.pop().backward(grad)
        x.grad = None
        block.zero_grad(set_to_none=True)

    def forward_backward():
        forward()
        backward()

    both = median_ms(forward_backward, repeats)
    fwd = median_ms(lambda: (forward(), outputs.clear()), repeats)
    layers = cfg.model.n_layers
    return {"precision": cfg.train.precision, "compile": cfg.train.compile, "threads": torch.get_num_threads(),
            "block_forward_ms": fwd, "block_backward_ms": both - fwd, "blocks_ms_per_step": layers * both,
            "trainer_ms_per_step": step_ms, "tokens_per_step": b * s,
            "region_ms_per_block": region_cost_ms(d, bool(cfg.train.compile), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300, help="trainer steps timed for the whole step")
    ap.add_argument("--eager-tokens-per-s", type=float, default=0.0, help="the strong eager loop's, for the budgets")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args, extra = ap.parse_known_args()
    ensure_data()
    with tempfile.TemporaryDirectory() as tmp:
        row = {**block_row(extra, args.repeats, args.steps, Path(tmp)), "cpu": cpu_description()}
    print(json.dumps(row))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "block_step.jsonl").write_text(json.dumps(row) + "\n")
    print(f"\nCPU: {row['cpu']}; {row['threads']} threads; precision {row['precision']}, compile {row['compile']}\n")
    print("| block forward ms | block backward ms | blocks ms/step | whole step ms | blocks' share | region cost ms/block |")
    print("|---|---|---|---|---|---|")
    print(f"| {row['block_forward_ms']:.2f} | {row['block_backward_ms']:.2f} | {row['blocks_ms_per_step']:.1f} | "
          f"{row['trainer_ms_per_step']:.1f} | {row['blocks_ms_per_step'] / row['trainer_ms_per_step']:.0%} | "
          f"{row['region_ms_per_block']:.3f} |")
    if args.eager_tokens_per_s:
        eager_ms = 1000 * row["tokens_per_step"] / args.eager_tokens_per_s
        for times in (1.3, 1.8, 2.0):
            budget = eager_ms / times
            print(f"{times}x the eager loop ({eager_ms:.1f} ms a step) allows {budget:.1f} ms a step: the blocks alone "
                  f"{'fit' if row['blocks_ms_per_step'] < budget else 'do not fit'} ({row['blocks_ms_per_step']:.1f} ms)")


if __name__ == "__main__":
    main()
