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


def stage_context(ctx: RecipeContext, run_dir: Path, overrides: list[str], config: str | None = None) -> RecipeContext:
    """The recipe's context with a stage's overrides (after the recipe's and the user's) and its run
    dir; `config` names another file of the recipe's directory (e.g. "clip.toml") for the stage."""
    merged = [*ctx.overrides, *overrides, f'--train.run_dir="{run_dir}"']
    path = ctx.config_path_of(ctx.name).parent / config if config else ctx.config_path
    return dataclasses.replace(ctx, cfg=load_config(path, merged), overrides=merged, config_file=path)


def train_stage(ctx: RecipeContext, label: str, run_dir: Path, overrides: list[str], command: str = "train",
                config: str | None = None) -> Path:
    """Train one stage (`tessera train | sft | dpo | clip | vlm`, timed as `label`, from `config` when
    given); its newest checkpoint."""
    with ctx.timer(label):
        return stage_context(ctx, run_dir, overrides, config).train(command)


def perplexity_of(model: torch.nn.Module, data_dir: Path, split: str, seq_len: int, batch_size: int,
                  max_batches: int = 0) -> float:
    """Token-weighted perplexity of `model` on a split of data prepared by `tessera data prepare`."""
    from tessera.core.data import read_manifest
    from tessera.core.evaluate import perplexity

    return perplexity(model, read_manifest(data_dir), split, seq_len, batch_size,
                      next(model.parameters()).device, max_batches)["perplexity"]
