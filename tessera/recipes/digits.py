"""Digits: CLIP on a small set of real scans, scikit-learn's handwritten digits (`tessera data digits`),
with zero-shot classification of held-out scans by the prompt "a handwritten digit {label}" and
image<->text Recall@K. The captions name the digit, so zero-shot accuracy here measures how well
the two towers learnt to agree, on scans never trained on. Before = the evaluation at step 0."""
from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tessera.recipes.runner import RecipeContext

HELD_OUT = (297, 40)  # the last scans (full, smoke); the others train
SMOKE = ["--train.steps=4", "--eval.every=2", "--log.every=1", "--optim.warmup_steps=1", "--train.batch_size=8",
         "--vision.n_layers=1", "--model.n_layers=1"]
REPORTED = ("val_loss", "val_zero_shot_acc", "val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5")


def prepare(ctx: RecipeContext) -> None:
    """`train/` and `held_out/` folders (images + captions.jsonl; the held-out rows carry their
    "label") and a character tokenizer of the captions and prompts, under data.path."""
    from tessera.core.tokenizer import train_char
    from tessera.multimodal.digits import write_digits

    root = ctx.data_dir
    scans = write_digits(root / "all", ctx.cfg.vision.image_size)
    rows = [json.loads(line) for line in (scans / "captions.jsonl").read_text().splitlines()]
    if ctx.smoke:
        rows = rows[:200]
    cut = len(rows) - ctx.pick(*HELD_OUT)
    for split, part in (("train", rows[:cut]), ("held_out", rows[cut:])):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        for row in part:
            shutil.copyfile(scans / "images" / row["image"], root / split / "images" / row["image"])
            row["label"] = row["caption"].rsplit(" ", 1)[1]
        (root / split / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    train_char([r["caption"] for r in rows] + [ctx.cfg.clip.prompt]).save(root / "tokenizer")


def run(ctx: RecipeContext) -> dict:
    """prepare -> `tessera clip` -> its evaluations at step 0 and at the end -> summary."""
    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.metrics import read_metrics
    from tessera.recipes.runner import write_summary
    from tessera.recipes.stages import train_stage

    root = ctx.data_dir
    with ctx.timer("prepare"):
        prepare(ctx)
    paths = [f'--data.path="{root / "train"}"', f'--clip.val_path="{root / "held_out"}"',
             f'--data.tokenizer="{root / "tokenizer" / "tokenizer.json"}"']
    train_stage(ctx, "train", ctx.out, paths, "clip")
    evals = [r for r in read_metrics(ctx.out) if "val_zero_shot_acc" in r]
    before, after = ({k: r[k] for k in REPORTED if k in r} for r in (evals[0], evals[-1]))
    return write_summary(ctx, before, after, {}, find_checkpoint(ctx.out))
