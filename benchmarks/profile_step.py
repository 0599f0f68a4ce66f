"""Where a CPU training step of the recipe goes: data, forward, backward, optimizer, evaluation,
logging, checkpoints and the trainer's own Python, per step, for the Llama and the GPT-2 blocks;
then torch.profiler's heaviest operators over 20 steps.

The phases are timed around the trainer's own calls (the loader, the objective, the engine's
backward/clip/step, `evaluate`, the metrics writer) during `Trainer.fit`, after a warm-up that
includes any compilation; "trainer" is what is left of the wall time: the loop's own host work.

    python benchmarks/profile_step.py                       # the recipe as `auto` resolves it here
    python benchmarks/profile_step.py --train.precision=fp32 --train.compile=false
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera.core.build import build_trainer  # noqa: E402
from tessera.core.config import load_config  # noqa: E402

BLOCKS = {"llama": [], "gpt2": ["--model.norm=layernorm", "--model.pos=learned", "--model.mlp=gelu", "--model.d_ff=0"]}
PHASES = ("data", "forward", "backward", "optimizer", "eval", "logging", "checkpoint", "trainer")


def timed(fn, phase: str, spent: dict):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - start
    return call


class TimedIterator:
    def __init__(self, it, spent: dict):
        self.it, self.spent = it, spent

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.spent["data"] += time.perf_counter() - start


def profile_blocks(blocks: str, steps: int, warmup: int, extra: list[str], run_dir: Path) -> dict:
    cfg = load_config(ROOT / "configs" / "recipes" / "shakespeare" / "train.toml", [
        f"--train.run_dir={json.dumps(str(run_dir))}", f"--train.steps={warmup + steps}", "--log.progress=false",
        "--checkpoint.every=0", *BLOCKS[blocks], *extra])
    cfg, trainer = build_trainer(cfg)
    trainer.fit(stop_at=warmup)  # compilation and allocator warm-up
    spent: dict[str, float] = defaultdict(float)
    engine, parts = trainer.engine, trainer.parts
    objective = engine.objective
    engine.objective = timed(objective, "forward", spent)
    engine.forward_backward = timed(engine.forward_backward, "forward+backward", spent)
    for name in ("clip_grad_norm", "step", "zero_grad"):
        setattr(engine, name, timed(getattr(engine, name), "optimizer", spent))
    trainer.evaluate = timed(trainer.evaluate, "eval", spent)
    parts.metrics.log = timed(parts.metrics.log, "logging", spent)
    trainer.save = timed(trainer.save, "checkpoint", spent)
    loader = parts.train_loader
    loader_iter = type(loader).__iter__
    type(loader).__iter__ = lambda self: TimedIterator(loader_iter(self), spent)
    try:
        start = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - start
    finally:
        type(loader).__iter__ = loader_iter
    spent["backward"] = spent.pop("forward+backward") - spent["forward"]
    spent["trainer"] = total - sum(spent.values())
    per_step = {k: 1000 * spent[k] / steps for k in PHASES}
    batches = iter(loader)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            trainer.train_step(batches)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"blocks": blocks, "precision": cfg.train.precision, "compile": cfg.train.compile, "steps": steps,
            "threads": torch.get_num_threads(), "ms_per_step": per_step, "total_ms_per_step": 1000 * total / steps,
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / 20, "calls_per_step": e.count / 20}
                        for e in ops]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="profiled steps (evaluation every 250 as in the recipe)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--blocks", nargs="+", default=["llama", "gpt2"], choices=sorted(BLOCKS))
    args, extra = ap.parse_known_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for blocks in args.blocks:
            row = profile_blocks(blocks, args.steps, args.warmup, extra, Path(tmp) / blocks)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| blocks | precision | compile | " + " | ".join(PHASES) + " | total ms/step |")
    print("|---" * (len(PHASES) + 4) + "|")
    for r in rows:
        cells = " | ".join(f"{r['ms_per_step'][k]:.2f}" for k in PHASES)
        print(f"| {r['blocks']} | {r['precision']} | {r['compile']} | {cells} | {r['total_ms_per_step']:.2f} |")
    for r in rows:
        print(f"\nheaviest operators, {r['blocks']} ({r['precision']}, compile {r['compile']}), self ms per step:")
        for op in r["top_ops"]:
            print(f"  {op['self_ms_per_step']:7.2f}  x{op['calls_per_step']:<6.0f} {op['op'][:90]}")


if __name__ == "__main__":
    main()
