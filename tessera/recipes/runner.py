"""One recipe run: prepare data -> train -> evaluate -> sample -> summary, each stage timed.

A recipe is a module `tessera.recipes.NAME` beside its config directory `configs/recipes/NAME/`
(`train.toml`, `README.md`). The module supplies the stages that differ between recipes
(`prepare`, `evaluate`, `sample`; optionally `SMOKE`, the overrides of a smoke run, and `COMMAND`,
the training command, or `train(ctx) -> checkpoint` for several stages); this runner does the rest
with Tessera's own functions: the config loader, `tessera train`'s command in process (the one
trainer), the loss plot, and the summary every recipe ends with.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from tessera.core.config import CONFIG_DIR, Config, ConfigError, load_config

if TYPE_CHECKING:
    import torch

RECIPES_DIR = CONFIG_DIR / "recipes"


def recipe_names() -> list[str]:
    """Every recipe: a directory of configs/recipes with a train.toml."""
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/train.toml"))


def recipe_module(name: str) -> ModuleType:
    if name not in recipe_names():
        raise ConfigError(f"recipe {name!r} does not exist; valid: {', '.join(recipe_names())}")
    return importlib.import_module(f"tessera.recipes.{name}")


@dataclass
class RecipeContext:
    """What every stage of a recipe reads: where to write, how big to be, the run's config.

    `cfg` is `configs/recipes/NAME/train.toml` with, in order, the recipe's `SMOKE` overrides (when
    `smoke`), `--train.run_dir=OUT` (when `--out` is given; a smoke run's default is the full run's
    directory + `_smoke`), a smoke run's data kept in `OUT/data`, and the user's `--section.key=value`
    overrides last, so the user always wins."""

    name: str
    smoke: bool
    cfg: Config
    overrides: list[str]
    command: str
    timings: dict[str, float] = field(default_factory=dict)
    config_file: Path | None = None  # a stage's own config beside train.toml (see stages.stage_context)

    @classmethod
    def create(cls, name: str, out: str | Path | None = None, smoke: bool = False,
               overrides: list[str] = ()) -> RecipeContext:
        module = recipe_module(name)
        base = list(getattr(module, "SMOKE", [])) if smoke else []
        if smoke and out is None:  # never over a full run's checkpoints
            out = f"{load_config(cls.config_path_of(name), [*base, *overrides]).train.run_dir}_smoke"
        if out is not None:
            base.append(f'--train.run_dir="{out}"')
        if smoke:
            base.append(f'--data.path="{Path(out) / "data"}"')
        merged = [*base, *overrides]
        command = " ".join(["tessera recipe", name, *(["--smoke"] if smoke else []), *([f"--out {out}"] if out else []),
                            *overrides])
        return cls(name, smoke, load_config(cls.config_path_of(name), merged), merged, command)

    @staticmethod
    def config_path_of(name: str) -> Path:
        return RECIPES_DIR / name / "train.toml"

    @property
    def config_path(self) -> Path:
        return self.config_file or self.config_path_of(self.name)

    @property
    def out(self) -> Path:
        """The run directory: checkpoints, metrics, summary.md/json and loss.png."""
        return Path(self.cfg.train.run_dir)

    @property
    def data_dir(self) -> Path:
        """Where `prepare` writes the tokenizer and shards (`data.path`)."""
        return Path(self.cfg.data.path)

    def pick(self, full, smoke):
        """A size for this run: `smoke` in a smoke run, else `full`."""
        return smoke if self.smoke else full

    @contextmanager
    def timer(self, stage: str):
        """Time a stage into `timings` (seconds, wall clock), printing its start."""
        print(f"== {self.name}: {stage}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def train(self, command: str = "train") -> Path:
        """`tessera train` (or sft, dpo, ...) on `cfg`, in this process, into a fresh run dir; the
        newest checkpoint."""
        from tessera.cli.train import cmd_train
        from tessera.core.checkpoint import find_checkpoint

        args = argparse.Namespace(command=command, config=str(self.config_path), resume=None, overwrite=True)
        cmd_train(args, self.overrides)
        return find_checkpoint(self.out)

    def initial_model(self) -> torch.nn.Module:
        """The model as training starts it (seeded initialisation, or `model.init_from`'s weights),
        for the 'before' metrics."""
        from tessera.cli.train import _init_from
        from tessera.core.build import with_vocab
        from tessera.core.data import read_manifest
        from tessera.core.task import BaseTask

        import torch

        cfg, init_weights = _init_from(self.cfg)
        cfg = with_vocab(cfg, read_manifest(self.data_dir).vocab_size, console=False)
        torch.manual_seed(cfg.train.seed)
        return BaseTask.new_transformer(cfg, torch.device("cpu"), init_weights).eval()

    def val_loss(self, model: torch.nn.Module, max_batches: int | None = None) -> float:
        """Mean next-token loss (nats) on the validation split: `eval.batches` batches of
        `train.batch_size` x `train.seq_len` unless `max_batches` says (0: all)."""
        from tessera.core.data import read_manifest
        from tessera.core.evaluate import perplexity

        batches = self.cfg.eval.batches if max_batches is None else max_batches
        return perplexity(model, read_manifest(self.data_dir), "val", self.cfg.train.seq_len,
                          self.cfg.train.batch_size, next(model.parameters()).device, batches)["nll"]


    def tokenizer(self):
        from tessera.core.tokenizer import load_tokenizer

        return load_tokenizer(self.data_dir)

    def sample_text(self, model: torch.nn.Module, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                    seed: int = 1337) -> str:
        """The model's continuation of `prompt` (without it), sampled as `tessera generate` does."""
        from tessera.core.generate import Sampling, generate_tokens

        tok = self.tokenizer()
        ids = tok.encode(prompt) if prompt else [tok.eos_id]
        out = generate_tokens(model, [ids], max_new_tokens, sampling=Sampling(temperature), stop_ids=[tok.eos_id],
                              pad_id=tok.pad_id, seed=seed)[0]
        return tok.decode([t for t in out if t not in (tok.bos_id, tok.eos_id, tok.pad_id)])


def load_trained(ckpt: Path) -> torch.nn.Module:
    from tessera.core.checkpoint import load_model_from_checkpoint

    return load_model_from_checkpoint(ckpt, "cpu").eval()


def run_recipe(name: str, out: str | Path | None = None, smoke: bool = False, overrides: list[str] = (),
               prepare_only: bool = False) -> dict | None:
    """Run a recipe's stages and write its summary; the summary as a dict (None with `prepare_only`:
    the data alone, for a launch config that trains elsewhere). A recipe whose 'before' is a model it
    trains itself (fine-tuning a model it pretrains) runs its own `run(ctx)` instead."""
    module = recipe_module(name)
    ctx = RecipeContext.create(name, out, smoke, overrides)
    if hasattr(module, "run") and not prepare_only:
        return module.run(ctx)
    with ctx.timer("prepare"):
        module.prepare(ctx)
    if prepare_only:
        print(f"prepared {ctx.data_dir} in {ctx.timings['prepare']:.1f} s")
        return None
    with ctx.timer("evaluate before"):
        before = module.evaluate(ctx, ctx.initial_model())
    with ctx.timer("train"):
        ckpt = module.train(ctx) if hasattr(module, "train") else ctx.train(getattr(module, "COMMAND", "train"))
    model = load_trained(ckpt)
    with ctx.timer("evaluate after"):
        after = module.evaluate(ctx, model)
    with ctx.timer("sample"):
        samples = module.sample(ctx, model)
    return write_summary(ctx, before, after, samples, ckpt)


def training_speed(run_dir: Path) -> dict:
    """Median tokens/s while training and the steps the history holds (metrics.jsonl)."""
    from tessera.core.metrics import read_metrics

    records = read_metrics(run_dir)
    rates = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    steps = max((r["step"] for r in records if "step" in r), default=0)
    return {"tokens_per_s": statistics.median(rates) if rates else float("nan"), "steps": steps}


def write_summary(ctx: RecipeContext, before: dict[str, float], after: dict[str, float], samples: dict[str, str],
                  ckpt: Path) -> dict:
    """`summary.json` (everything, machine-readable), `summary.md` (one screen: metrics before and
    after, wall time per stage, tokens/s, a sample) and `loss.png` in the run dir; the markdown is
    printed too."""
    from tessera.core.plot import plot_run
    from tessera.core.storage import write_text_atomic

    speed = training_speed(ctx.out)
    plot = plot_run(ctx.out)
    summary = {"recipe": ctx.name, "smoke": ctx.smoke, "command": ctx.command, "checkpoint": str(ckpt),
               "metrics_before": before, "metrics_after": after, "wall_s": dict(ctx.timings),
               "wall_s_total": sum(ctx.timings.values()), "tokens_per_s": speed["tokens_per_s"],
               "steps": speed["steps"], "samples": samples, "loss_plot": str(plot)}
    write_text_atomic(ctx.out / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    text = summary_markdown(summary)
    write_text_atomic(ctx.out / "summary.md", text)
    print(text)
    return summary


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def summary_markdown(s: dict) -> str:
    keys = list(dict.fromkeys([*s["metrics_before"], *s["metrics_after"]]))
    rows = [f"| {k} | {_fmt(s['metrics_before'].get(k, '-'))} | {_fmt(s['metrics_after'].get(k, '-'))} |" for k in keys]
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in s["wall_s"].items())
    lines = [f"# Recipe {s['recipe']}{' (smoke)' if s['smoke'] else ''}", "",
             f"`{s['command']}`: {s['steps']} steps, {_fmt(s['tokens_per_s'])} tokens/s while training "
             f"(median), {s['wall_s_total']:.1f} s wall ({stages})", "",
             "| metric | before training | after training |", "| --- | --- | --- |", *rows, "",
             f"checkpoint {s['checkpoint']}, loss curves {s['loss_plot']}"]
    for prompt, text in s["samples"].items():
        lines += ["", f"sample (prompt {prompt!r}):", "```", text.rstrip()[:800], "```"]
    return "\n".join(lines) + "\n"
