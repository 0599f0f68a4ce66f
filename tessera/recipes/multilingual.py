"""Multilingual: one small model of six languages in six scripts (English, Russian, Greek,
Chinese, Arabic, Hindi: Django's translation catalogs, `multilingual_data.py`), with a byte-level
BPE tokenizer and a training mix both drawn with temperature sampling of the languages
(p_i ∝ n_i^(1/T), `MIX_TEMPERATURE`). Reported per language: tokenizer fertility (with the
natural mix, T = 1, beside it), validation perplexity, and the share of sampled continuations
written in the prompt's script."""
from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tessera.recipes.runner import RecipeContext

MIX_TEMPERATURE = 3.0  # 1: the natural mix; larger: flatter towards equal shares of the languages
VAL_SHARE = 0.1  # of each language's messages, held out
SMOKE = ["--train.steps=10", "--train.seq_len=32", "--model.max_seq_len=32", "--model.n_layers=2",
         "--model.d_model=32", "--model.d_ff=88", "--checkpoint.every=0", "--log.every=5",
         "--train.compile=false", "--optim.warmup_steps=2"]


def _split(ctx: RecipeContext) -> dict[str, tuple[list[str], list[str]]]:
    """(training, held-out) messages of every language: a seeded shuffle, the last VAL_SHARE held out."""
    from tessera.recipes.multilingual_data import LANGUAGES, django_messages

    split = {}
    for language in LANGUAGES:
        messages = django_messages(language)
        messages = random.Random(f"{ctx.cfg.train.seed}-{language}").sample(messages, len(messages))
        cut = len(messages) - max(1, int(len(messages) * VAL_SHARE))
        split[language] = (messages[:cut], messages[cut:])
    return split


def prepare(ctx: RecipeContext) -> None:
    """The tokenizer trained on the temperature mix of the training messages, the training shards
    of that mix (no validation split: the mix repeats messages), one directory of held-out messages
    per language (`val_LL/`), and `fertility.json` for the tokenizer of the natural mix, T = 1."""
    from tessera.core.data import prepare as prepare_shards
    from tessera.core.tokenizer import train_bpe
    from tessera.recipes.multilingual_data import fertility, temperature_mix

    root = ctx.data_dir
    root.mkdir(parents=True, exist_ok=True)
    split = _split(ctx)
    train = {k: v[0] for k, v in split.items()}
    total = ctx.pick(800_000, 40_000)
    vocab = ctx.pick(2048, 400)
    seed = ctx.cfg.train.seed
    mixed = temperature_mix(train, MIX_TEMPERATURE, total, seed)
    tok = train_bpe(iter(mixed), vocab)
    natural = train_bpe(iter(temperature_mix(train, 1.0, total, seed)), vocab)
    (root / "train.txt").write_text("\n".join(mixed), encoding="utf-8")
    prepare_shards([str(root / "train.txt")], tok, root, val_fraction=0.0, shard_tokens=ctx.pick(0, 4_000))
    for language, (_, heldout) in split.items():
        path = root / f"val_{language}.txt"
        path.write_text("\n".join(heldout), encoding="utf-8")
        prepare_shards([str(path)], tok, root / f"val_{language}", val_fraction=0.0, shard_tokens=ctx.pick(0, 2_000))
    natural_fertility = {k: fertility(natural.encode, v[1])["tokens_per_char"] for k, v in split.items()}
    (root / "fertility.json").write_text(json.dumps(natural_fertility, indent=2))


def evaluate(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, float]:
    """Per language: tokens per word and per character of the held-out messages (this tokenizer; the
    natural mix's per character beside it), validation perplexity, and the in-script share of samples."""
    from tessera.recipes.multilingual_data import LANGUAGES, fertility, in_script
    from tessera.recipes.stages import perplexity_of

    tok = ctx.tokenizer()
    natural = json.loads((ctx.data_dir / "fertility.json").read_text())
    t = ctx.cfg.train
    out: dict[str, float] = {}
    for language, (_, script) in LANGUAGES.items():
        heldout = (ctx.data_dir / f"val_{language}.txt").read_text(encoding="utf-8").split("\n")
        fert = fertility(tok.encode, heldout)
        out[f"{language} tokens/word"] = fert["tokens_per_word"]
        out[f"{language} tokens/char (T={MIX_TEMPERATURE:g})"] = fert["tokens_per_char"]
        out[f"{language} tokens/char (T=1)"] = natural[language]
        out[f"{language} val_ppl"] = perplexity_of(model, ctx.data_dir / f"val_{language}", "train", t.seq_len,
                                                   t.batch_size)
        continuations = _continuations(ctx, model, heldout[: ctx.pick(20, 3)])
        out[f"{language} in-script share"] = sum(in_script(c, script) for c in continuations) / len(continuations)
    return out


def _prompt(message: str) -> str:
    """The start of a held-out message that a continuation follows: its first word, or (a script
    without spaces) its first two characters."""
    words = message.split()
    return words[0] if len(words) > 1 else message[:2]


def _continuations(ctx: RecipeContext, model: torch.nn.Module, messages: list[str]) -> list[str]:
    """Sampled continuations (temperature 0.8, at most 40 tokens) of the start of each message, up to
    the end of the message (the first newline: the next message of the mix is in any language),
    decoded as one left-padded batch. An empty continuation has no letters and so fails the check."""
    from tessera.core.generate import Sampling, generate_tokens

    tok = ctx.tokenizer()
    outs = generate_tokens(model, [tok.encode(_prompt(m)) for m in messages], ctx.pick(40, 8),
                           sampling=Sampling(0.8), stop_ids=[tok.eos_id], pad_id=tok.pad_id, seed=ctx.cfg.train.seed)
    return [tok.decode([t for t in out if t != tok.eos_id]).split("\n")[0] for out in outs]


def sample(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, str]:
    """One continuation per language, of its first held-out message's start."""
    from tessera.recipes.multilingual_data import LANGUAGES

    samples = {}
    for language in LANGUAGES:
        first = (ctx.data_dir / f"val_{language}.txt").read_text(encoding="utf-8").split("\n")[0]
        prompt = _prompt(first)
        samples[f"{language}: {prompt}"] = prompt + ctx.sample_text(model, prompt, ctx.pick(60, 10))
    return samples
