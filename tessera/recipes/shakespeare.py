"""Shakespeare: a character-level model of Tiny Shakespeare (data/tinyshakespeare.txt), the README's
demo. The stages the runner calls: `prepare`, `evaluate`, `sample`."""
from __future__ import annotations


from typing import TYPE_CHECKING

from tessera.core.config import CONFIG_DIR

if TYPE_CHECKING:
    import torch

    from tessera.recipes.runner import RecipeContext

CORPUS = CONFIG_DIR.parent / "data" / "tinyshakespeare.txt"
PROMPT = "ROMEO:"
SMOKE = ["--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64", "--model.max_seq_len=32",
         "--train.seq_len=32", "--train.batch_size=4", "--train.steps=10", "--optim.warmup_steps=2", "--eval.every=5",
         "--eval.batches=2", "--checkpoint.every=10", "--log.every=5", "--train.compile=false"]


def prepare(ctx: RecipeContext) -> None:
    """A character tokenizer and 90/10 shards of the play text (a smoke run: its first 100,000
    characters); kept when a full run's data is already there."""
    from tessera.core.data import prepare as prepare_shards
    from tessera.core.tokenizer import train_char

    if not ctx.smoke and (ctx.data_dir / "manifest.json").exists():
        print(f"using the prepared data in {ctx.data_dir}")
        return
    text = CORPUS.read_text(encoding="utf-8")
    source = CORPUS
    if ctx.smoke:
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        source = ctx.data_dir / "corpus.txt"
        source.write_text(text[:100_000], encoding="utf-8")
    tok = train_char([source.read_text(encoding="utf-8")])
    prepare_shards([str(source)], tok, ctx.data_dir, shard_tokens=ctx.pick(100_000, 20_000))


def evaluate(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, float]:
    """Validation loss over the whole validation split (a smoke run: eval.batches batches)."""
    return {"val_loss": ctx.val_loss(model, ctx.pick(0, None))}


def sample(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, str]:
    return {PROMPT: PROMPT + ctx.sample_text(model, PROMPT, ctx.pick(500, 50))}


