"""Training speed of the ViT image encoder: images/s of forward + backward (+ AdamW step) on CPU.

    python benchmarks/vision_encoder.py [--image-size 32] [--patch-size 4] [--batch 32 64] [--steps 10]

A small encoder (the size `tessera clip` trains on synthetic scenes) on random pixels; the loss is
the mean square of the pooled feature, so the timing is the encoder's own. Writes
benchmarks/results/vision_encoder.json and prints a markdown table.
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

from tessera.core.config import VisionConfig  # noqa: E402
from tessera.multimodal.vision import VisionTransformer  # noqa: E402


def images_per_s(model: VisionTransformer, optimizer, batch: int, steps: int) -> float:
    cfg = model.cfg
    pixels = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)

    def step():
        model(pixels)[1].square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    cfg = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, n_layers=args.layers,
                       d_model=args.width, n_heads=args.heads)
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    print("| batch | images/s | tokens/s | GFLOP/s |\n|---|---|---|---|")
    for batch in args.batch:
        speed = images_per_s(model, optimizer, batch, args.steps)
        row = {"batch": batch, "images_per_s": speed, "tokens_per_s": speed * cfg.num_tokens,
               "gflops_per_s": speed * model.flops_per_image() / 1e9}
        rows.append(row)
        print(f"| {batch} | {speed:,.1f} | {row['tokens_per_s']:,.0f} | {row['gflops_per_s']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "params": model.num_params(), "steps": args.steps,
            "encoder": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "tokens": cfg.num_tokens,
                        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads}}
    (out / "vision_encoder.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
