"""Training speed of the image-conditioned LM on CPU: tokens/s of a full step (forward, backward,
AdamW) for each stage's freeze rule and both fusions.

    python benchmarks/vlm_train.py [--batch 16] [--steps 5]

The recipe's sizes (configs/recipes/scenes_vlm/train.toml): a 3-layer ViT of 16 patch tokens (8-pixel patches) at 32 pixels,
a 4-layer 128-wide LM, rows of 48 positions (16 image + 32 text, answer loss on the last 8). A
token is a position the LM runs (image tokens included). Writes benchmarks/results/vlm_train.json
and prints a markdown table.
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

from tessera.core.config import ModelConfig, OptimConfig, VisionConfig, VLMConfig  # noqa: E402
from tessera.core.optim import build_optimizer  # noqa: E402
from tessera.multimodal.vlm import VLM, set_trainable, vlm_objective  # noqa: E402


def batch_of(model: VLM, rows: int, text: int, vocab: int) -> dict:
    t = model.image_tokens
    ids = torch.randint(0, vocab, (rows, t + text))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :t] = True
    targets = torch.full_like(ids, -100)
    answer = min(8, text - 1)
    targets[:, -answer - 1:-1] = ids[:, -answer:]
    size = model.vision.cfg.image_size
    return {"pixel_values": torch.randn(rows, 3, size, size), "input_ids": ids, "image_mask": mask, "targets": targets}


def tokens_per_s(model: VLM, batch: dict, steps: int) -> float:
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))

    def step():
        vlm_objective(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch["input_ids"].numel() * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--text", type=int, default=32, help="text positions a row")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    vision = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, n_layers=3, n_heads=4,
                          d_model=args.width, pool="mean")
    text = ModelConfig(vocab_size=320, n_layers=4, n_heads=4, d_model=args.width, max_seq_len=256, pos="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False)
    rows = []
    print("| fusion | stage | trained parameters | tokens/step | tokens/s |\n|---|---|---|---|---|")
    for fusion in ("prefix", "cross_attention"):
        for stage in ("align", "instruct"):
            torch.manual_seed(0)
            cfg = VLMConfig(fusion=fusion, stage=stage)
            model = VLM(vision, text, cfg)
            set_trainable(model, cfg.frozen_parts)
            batch = batch_of(model, args.batch, args.text, text.vocab_size)
            speed = tokens_per_s(model, batch, args.steps)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append({"fusion": fusion, "stage": stage, "trained_params": trained,
                         "tokens_per_step": batch["input_ids"].numel(), "tokens_per_s": speed})
            print(f"| {fusion} | {stage} | {trained:,} | {batch['input_ids'].numel():,} | {speed:,.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlm_train.json").write_text(json.dumps({"batch": args.batch, "steps": args.steps, "rows": rows,
                                                    "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
