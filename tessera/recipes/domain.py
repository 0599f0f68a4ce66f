"""Domain fine-tuning: a model pretrained on general text (Tiny Shakespeare, trained here, or a
Hugging Face directory given as `--model.init_from=hf:DIR`) fine-tuned on mathematical prose
(SymPy's docstrings, `domain_corpus.py`), once with every weight and once with LoRA adapters.
Perplexity on held-out domain text and on held-out general text, before and after, side by
side: what the domain gains and what the general text loses (forgetting)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tessera.core.config import CONFIG_DIR

if TYPE_CHECKING:
    import torch

    from tessera.recipes.runner import RecipeContext

GENERAL = CONFIG_DIR.parent / "data" / "tinyshakespeare.txt"
PROMPT = "The derivative of"
SMOKE = ["--train.steps=12", "--train.seq_len=32", "--model.max_seq_len=32", "--model.n_layers=2",
         "--model.d_model=32", "--model.d_ff=88", "--eval.every=0", "--checkpoint.every=0", "--log.every=4",
         "--train.compile=false", "--optim.warmup_steps=2"]
# what the fine-tuning stages change in train.toml (the pretraining config); sizes as (full, smoke)
FINETUNE_STEPS = (150, 6)
FULL = ["--optim.lr=3e-4", "--optim.min_lr=3e-5", "--optim.warmup_steps=20"]
LORA = ["--lora.r=8", "--lora.alpha=16", "--optim.lr=3e-3", "--optim.min_lr=3e-4", "--optim.warmup_steps=20",
        "--optim.weight_decay=0"]


def prepare(ctx: RecipeContext) -> None:
    """Under data.path: `general/` (the play, 90/10), `domain/` (SymPy prose of the training files,
    95/5) and `domain_heldout/` (the prose of the held-out files, all of it evaluated), tokenized with
    a byte-level BPE trained on the general text alone (the pretrained model's tokenizer), or with
    the tokenizer of `model.init_from`."""
    from tessera.core.data import prepare as prepare_shards
    from tessera.core.tokenizer import load_tokenizer, train_bpe
    from tessera.interop.hf import init_tokenizer_path
    from tessera.recipes.domain_corpus import sympy_prose

    root = ctx.data_dir
    root.mkdir(parents=True, exist_ok=True)
    general = GENERAL.read_text(encoding="utf-8")[: ctx.pick(None, 60_000)]
    (root / "general.txt").write_text(general, encoding="utf-8")
    train, heldout = sympy_prose(ctx.pick(1_000_000, 40_000))
    (root / "domain.txt").write_text("\n".join(train), encoding="utf-8")
    (root / "domain_heldout.txt").write_text("\n".join(heldout), encoding="utf-8")
    source = init_tokenizer_path(ctx.cfg.model)
    if source is not None:
        tok = load_tokenizer(source)
    else:
        tok = train_bpe(iter([general[: int(len(general) * 0.9)]]), ctx.pick(2048, 300))
    tok.save(root)
    shards = ctx.pick(0, 4_000)
    prepare_shards([str(root / "general.txt")], tok, root / "general", 0.1, shards)
    prepare_shards([str(root / "domain.txt")], tok, root / "domain", 0.05, shards)
    prepare_shards([str(root / "domain_heldout.txt")], tok, root / "domain_heldout", 0.0, shards)


def evaluate(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, float]:
    """Perplexity on the held-out domain files and on the general text's validation split."""
    from tessera.recipes.stages import perplexity_of

    t = ctx.cfg.train
    batches = ctx.pick(0, 2)
    return {"domain_ppl": perplexity_of(model, ctx.data_dir / "domain_heldout", "train", t.seq_len, t.batch_size, batches),
            "general_ppl": perplexity_of(model, ctx.data_dir / "general", "val", t.seq_len, t.batch_size, batches)}


def sample(ctx: RecipeContext, model: torch.nn.Module) -> str:
    return PROMPT + ctx.sample_text(model, PROMPT, ctx.pick(80, 10))


def run(ctx: RecipeContext) -> dict:
    """prepare -> pretrain (unless model.init_from) -> full and LoRA fine-tuning -> the three models
    evaluated side by side -> summary."""
    from tessera.cli.train import _init_from
    from tessera.core.task import BaseTask
    from tessera.recipes.runner import load_trained, write_summary
    from tessera.recipes.stages import stage_context, train_stage

    import torch

    with ctx.timer("prepare"):
        prepare(ctx)
    root = ctx.data_dir
    base_source = ctx.cfg.model.init_from
    if not base_source:
        base_source = str(train_stage(ctx, "pretrain (general text)", ctx.out / "pretrain",
                                      [f'--data.path="{root / "general"}"']))
    tune = [f'--model.init_from="{base_source}"', f'--data.path="{root / "domain"}"',
            f"--train.steps={ctx.pick(*FINETUNE_STEPS)}"]
    full = train_stage(ctx, "fine-tune (every weight)", ctx.out, [*tune, *FULL])
    train_stage(ctx, "fine-tune (LoRA)", ctx.out / "lora", [*tune, *LORA])
    with ctx.timer("evaluate"):
        cfg, init_weights = _init_from(stage_context(ctx, ctx.out, tune[:1]).cfg)
        models = {"base": BaseTask.new_transformer(cfg, torch.device("cpu"), init_weights).eval(),
                  "full": load_trained(full), "LoRA": load_trained(ctx.out / "lora" / "merged")}
        before, after, lora = (evaluate(ctx, m) for m in models.values())
    with ctx.timer("sample"):
        samples = {f"{PROMPT} ({name})": sample(ctx, m) for name, m in models.items()}
    return write_summary(ctx, before, {**after, **{f"{k} (LoRA)": v for k, v in lora.items()}}, samples, full)
