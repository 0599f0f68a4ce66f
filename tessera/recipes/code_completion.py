"""Code completion: a small GPT trained on the Python standard library of the interpreter running
Tessera, evaluated on held-out files by what its greedy completions of functions do (parse, next
line, tests), and served for an editor (`tessera serve`, `/v1/completions` with `stop`)."""
from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tessera.recipes import code_eval

if TYPE_CHECKING:
    import torch

    from tessera.recipes.runner import RecipeContext

VAL_PERCENT = 5  # of the non-test files, chosen by a hash of their path
SMOKE = ["--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64", "--model.max_seq_len=64",
         "--train.seq_len=64", "--train.batch_size=4", "--train.steps=10", "--optim.warmup_steps=2", "--eval.every=5",
         "--eval.batches=2", "--checkpoint.every=10", "--log.every=5", "--train.compile=false"]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_test_file(rel: str) -> bool:
    """A test of the corpus: test_*.py, or any file under a test/ or tests/ directory."""
    path = PurePosixPath(rel)
    return path.name.startswith("test_") or any(part in ("test", "tests") for part in path.parts[:-1])


def corpus(root: Path, max_files: int = 0) -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 .py file under `root` (installed packages left out),
    sorted by path, each distinct content once (the first path keeps it); `max_files` > 0 keeps
    that many, spread evenly over the sorted list (smoke runs)."""
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    if max_files:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    seen, out = set(), []
    for path in files:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        seen.add(digest)
        out.append((path.relative_to(root).as_posix(), text))
    return out


def split_by_file(files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val): val is VAL_PERCENT of the files that are not tests, picked by a hash of the path
    (stable across machines and corpus changes); tests and the rest train."""
    def held_out(rel: str) -> bool:
        return not is_test_file(rel) and int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < VAL_PERCENT

    return [f for f in files if not held_out(f[0])], [f for f in files if held_out(f[0])]


def _write_jsonl(path: Path, files: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"path": rel, "text": text}) + "\n" for rel, text in files), encoding="utf-8")


def read_split(ctx: RecipeContext, split: str) -> list[tuple[str, str]]:
    path = ctx.data_dir / "corpus" / f"{split}.jsonl"
    return [(r["path"], r["text"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def prepare(ctx: RecipeContext) -> None:
    """The deduplicated stdlib split by file, a byte-level BPE tokenizer trained on the train files,
    and the shards (train: train files; val: held-out files). A full run's data is kept once made."""
    from tessera.core.data import prepare as prepare_shards
    from tessera.core.tokenizer import train_bpe

    if not ctx.smoke and (ctx.data_dir / "manifest.json").exists():
        print(f"using the prepared data in {ctx.data_dir} ({ctx.data_dir / 'corpus' / 'split.json'})")
        return
    root = stdlib_root()
    train, val = split_by_file(corpus(root, ctx.pick(0, 60)))
    if not val:  # a smoke corpus too small for the hash to pick any: its first non-test file
        val = [next(f for f in train if not is_test_file(f[0]))]
        train = [f for f in train if f != val[0]]
    folder = ctx.data_dir / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "val.jsonl", val)
    (folder / "split.json").write_text(json.dumps({
        "root": str(root), "train_files": len(train), "val_files": len(val),
        "train_test_files": sum(is_test_file(r) for r, _ in train), "val": [r for r, _ in val]}, indent=1))
    print(f"corpus {root}: {len(train)} train files ({sum(is_test_file(r) for r, _ in train)} of them tests), "
          f"{len(val)} held-out files")
    tok = train_bpe((text for _, text in train), ctx.pick(4096, 320))
    prepare_shards([str(folder / "train.jsonl")], tok, ctx.data_dir, val_inputs=[str(folder / "val.jsonl")])


def complete(ctx: RecipeContext, model: torch.nn.Module, prompts: list[str], max_new_tokens: int,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of `prompts`, each cropped from the left to leave the model's window room
    for `max_new_tokens`, decoded in batches."""
    from tessera.core.generate import Sampling, generate_tokens

    tok = ctx.tokenizer()
    room = model.cfg.max_seq_len - max_new_tokens
    ids = [tok.encode(p)[-room:] or [tok.eos_id] for p in prompts]
    out = []
    for i in range(0, len(ids), batch_size):
        outs = generate_tokens(model, ids[i:i + batch_size], max_new_tokens, sampling=Sampling(0.0),
                               stop_ids=[tok.eos_id], pad_id=tok.pad_id)
        out += [tok.decode([t for t in o if t != tok.eos_id]) for o in outs]
    return out


def held_out_tasks(ctx: RecipeContext) -> list[code_eval.FunctionTask]:
    tasks = [t for rel, text in read_split(ctx, "val") for t in code_eval.function_tasks(text, rel)]
    random.Random(0).shuffle(tasks)
    return tasks[:ctx.pick(100, 4)]


def evaluate(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, float]:
    """Validation loss on the held-out files, and on their functions (signature and first
    statements given): the share of greedy completions that parse, of next lines exactly right, and
    pass@1 on the self-written tested tasks."""
    max_new = ctx.pick(128, 12)
    tasks = held_out_tasks(ctx)
    outs = complete(ctx, model, [t.prefix + t.head[:-1] for t in tasks], max_new)
    done = [code_eval.after_head(t.head, o) for t, o in zip(tasks, outs)]
    tested = code_eval.TESTED_TASKS[:ctx.pick(len(code_eval.TESTED_TASKS), 2)]
    tested_outs = complete(ctx, model, [t.head[:-1] for t in tested], max_new)
    passed = [code_eval.passes(t, code_eval.after_head(t.head, o)) for t, o in zip(tested, tested_outs)]
    return {"val_loss": ctx.val_loss(model, ctx.pick(0, None)),
            "parse_rate": sum(code_eval.parses(t, c) for t, c in zip(tasks, done)) / len(tasks),
            "next_line_exact": sum(code_eval.next_line_matches(t, c) for t, c in zip(tasks, done)) / len(tasks),
            "pass_at_1": sum(passed) / len(passed), "functions": float(len(tasks)), "tested_tasks": float(len(tested))}


def sample(ctx: RecipeContext, model: torch.nn.Module) -> dict[str, str]:
    """A held-out function and a tested task, each head with its greedy completion (cut at the dedent)."""
    task = held_out_tasks(ctx)[0]
    tested = next(t for t in code_eval.TESTED_TASKS if t.name == "fibonacci")
    out = {}
    for label, head, indent, prefix in ((f"{task.source}: {task.name}", task.head, task.indent, task.prefix),
                                        (f"tested task {tested.name}", tested.head, 0, "")):
        text = complete(ctx, model, [prefix + head[:-1]], ctx.pick(128, 12))[0]
        out[label] = head + code_eval.cut_at_dedent(code_eval.after_head(head, text), indent)
    return out
