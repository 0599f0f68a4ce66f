"""Training throughput: Tessera's stack against the eager, unfused baseline, in one alternating run.

Both sides start from the same weights, see the same batches in the same order and follow the
same learning-rate schedule; they take turns for `--segments` stretches so that machine noise
falls on both. Reports tokens/s (warm-up steps excluded), the ratio, the final validation loss,
and the largest relative gap between their loss curves (averaged over 10-step windows).

    python benchmarks/train_throughput.py --recipe char      # configs/recipes/shakespeare/train.toml, 2000 steps
    python benchmarks/train_throughput.py --recipe medium    # 6 layers x 384, context 256, 200 steps
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline_model import BaselineTransformer  # noqa: E402
from tessera.core.build import build_trainer  # noqa: E402
from tessera.core.config import load_config  # noqa: E402
from tessera.core.data import StreamingLoader  # noqa: E402
from tessera.core.optim import lr_at, param_groups, set_lr  # noqa: E402

DATA = ROOT / "data" / "prepared" / "shakespeare_char"
RECIPES = {
    # the small CPU recipe as it is; Tessera adds bf16 autocast, torch.compile and the fused AdamW
    "char": ["--train.precision=bf16", "--train.compile=true"],
    # the medium model, with the same three additions
    "medium": ["--model.n_layers=6", "--model.n_heads=6", "--model.d_model=384", "--model.d_ff=1024",
               "--model.max_seq_len=256", "--train.seq_len=256", "--train.batch_size=16",
               "--train.steps=200", "--optim.warmup_steps=20", "--train.precision=bf16", "--train.compile=true"],
}


def ensure_data() -> None:
    if not (DATA / "manifest.json").exists():
        from tessera.core.data import prepare
        from tessera.core.tokenizer import train_char

        text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
        prepare([str(ROOT / "data" / "tinyshakespeare.txt")], train_char([text]), DATA, shard_tokens=100_000)


def windowed(series: list[float], width: int = 10) -> list[float]:
    return [statistics.fmean(series[i : i + width]) for i in range(0, len(series) - width + 1, width)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="char")
    ap.add_argument("--steps", type=int, help="override the recipe's step count")
    ap.add_argument("--segments", type=int, default=4, help="how many times the two sides take turns")
    ap.add_argument("--warmup", type=int, default=10, help="steps per side left out of tokens/s (compilation)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args, extra = ap.parse_known_args()
    ensure_data()
    overrides = [f"--data.path={json.dumps(str(DATA))}", "--train.run_dir=\"/tmp/tessera-bench\"",
                 "--log.progress=false", "--log.tensorboard=false", "--checkpoint.every=0", "--eval.every=0",
                 *RECIPES[args.recipe], *extra]
    if args.steps:
        overrides.append(f"--train.steps={args.steps}")
    cfg, trainer = build_trainer(load_config(ROOT / "configs" / "recipes" / "shakespeare" / "train.toml", overrides))
    t = cfg.train
    steps, device = t.steps, trainer.parts.device

    baseline = BaselineTransformer(cfg.model).to(device)
    baseline.load_state_dict(trainer.engine.model.state_dict())
    base_opt = torch.optim.AdamW(param_groups(baseline, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                 betas=cfg.optim.betas, eps=cfg.optim.eps)
    base_loader = StreamingLoader(trainer.parts.train_loader.manifest, "train", t.batch_size, t.seq_len, seed=t.seed,
                                  shuffle_buffer=cfg.data.shuffle_buffer)
    base_batches, ours_batches = iter(base_loader), iter(trainer.parts.train_loader)

    def baseline_step(step: int) -> float:
        set_lr(base_opt, lr_at(step, cfg.optim, steps))
        x, y = next(base_batches)
        loss = baseline(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), cfg.optim.grad_clip)
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)
        return loss.item()

    sides = {"tessera": {"losses": [], "times": []}, "baseline": {"losses": [], "times": []}}
    bounds = [round(i * steps / args.segments) for i in range(args.segments + 1)]
    for seg in range(args.segments):
        for name in ("tessera", "baseline"):
            for step in range(bounds[seg], bounds[seg + 1]):
                start = time.perf_counter()
                loss = trainer.train_step(ours_batches)[0] if name == "tessera" else baseline_step(step)
                sides[name]["times"].append(time.perf_counter() - start)
                sides[name]["losses"].append(loss)
        print(f"segment {seg + 1}/{args.segments}: step {bounds[seg + 1]}, "
              f"loss tessera {sides['tessera']['losses'][-1]:.4f} baseline {sides['baseline']['losses'][-1]:.4f}",
              flush=True)

    val_ours = trainer.evaluate()["val_loss"]
    baseline.eval()
    with torch.no_grad():
        trainer.parts.val_loader.reset()
        vals = [baseline(x.to(device), y.to(device)).item()
                for x, y in itertools.islice(trainer.parts.val_loader, cfg.eval.batches)]
    val_base = statistics.fmean(vals)

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    result = {"recipe": args.recipe, "steps": steps, "tokens_per_step": tokens_per_step,
              "threads": torch.get_num_threads(), "overrides": overrides}
    for name, side in sides.items():
        timed = side["times"][args.warmup :]
        result[name] = {"tokens_per_s": tokens_per_step * len(timed) / sum(timed),
                        "wall_s": sum(side["times"]), "final_loss": side["losses"][-1]}
    result["tessera"]["val_loss"], result["baseline"]["val_loss"] = val_ours, val_base
    result["speedup"] = result["tessera"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
    ours_w, base_w = windowed(sides["tessera"]["losses"]), windowed(sides["baseline"]["losses"])
    result["max_loss_curve_gap"] = max(abs(a - b) / b for a, b in zip(ours_w, base_w))

    print("\n| side | tokens/s | wall s | final train loss | val loss |\n|---|---|---|---|---|")
    for name in ("baseline", "tessera"):
        r = result[name]
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} | {r['final_loss']:.4f} | {r['val_loss']:.4f} |")
    print(f"\nspeedup {result['speedup']:.2f}x, largest loss-curve gap {100 * result['max_loss_curve_gap']:.2f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_throughput_{args.recipe}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
