"""What the recipes of several training stages share: a stage trained by the recipe's own config
with the stage's overrides into a run directory of its own, and perplexity on prepared text."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from tessera.core.config import load_config

if TYPE_CHECKING:
    import torch

    from tessera.recipes.runner import RecipeContext


def stage_context(ctx: RecipeContext, run_dir: Path, overrides: list[str]) -> RecipeContext:
    """The recipe's context with a stage's overrides (after the recipe's and the user's) and its run dir."""
    merged = [*ctx.overrides, *overrides, f'--train.run_dir="{run_dir}"']
    return dataclasses.replace(ctx, cfg=load_config(ctx.config_path, merged), overrides=merged)


def train_stage(ctx: RecipeContext, label: str, run_dir: Path, overrides: list[str], command: str = "train") -> Path:
    """Train one stage (`tessera train | sft | dpo`, timed as `label`); its newest checkpoint."""
    with ctx.timer(label):
        return stage_context(ctx, run_dir, overrides).train(command)


def perplexity_of(model: torch.nn.Module, data_dir: Path, split: str, seq_len: int, batch_size: int,
                  max_batches: int = 0) -> float:
    """Token-weighted perplexity of `model` on a split of data prepared by `tessera data prepare`."""
    from tessera.core.data import read_manifest
    from tessera.core.evaluate import perplexity

    return perplexity(model, read_manifest(data_dir), split, seq_len, batch_size,
                      next(model.parameters()).device, max_batches)["perplexity"]
