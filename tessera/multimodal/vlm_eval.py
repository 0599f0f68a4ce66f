"""`tessera eval captions | vqa`: an image-conditioned LM checkpoint judged on a folder of images
with their captions or question/answer pairs (as `tessera data synth-scenes` writes them).

Greedy answers, batched. Captions: exact match (with any reference), CIDEr-D, METEOR (nltk's, best
reference), corpus BLEU and ROUGE (core.evaluate, against the first reference). Questions: exact
match after lower-casing and trimming, which is the VQA accuracy min(1, matches / 3) when, as here,
each question has one reference answer.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tessera.core.data import DataError
from tessera.core.evaluate import text_metrics
from tessera.multimodal.cider import cider_d
from tessera.multimodal.vlm_inference import answers, image_pixels


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".?!").split())


class _NoSynonyms:
    """A WordNet with no synsets: METEOR's synonym stage matches nothing (WordNet's data cannot be
    downloaded here), so words match exactly or by their Porter stems."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def meteor(predictions: list[str], references: list[list[str]]) -> float:
    """Mean METEOR over captions (nltk: alpha 0.9, beta 3, gamma 0.5; the best of each caption's references),
    with exact and stem matches and without WordNet synonyms."""
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([normalise(r).split() for r in refs], normalise(p).split(), wordnet=_NoSynonyms())
              for p, refs in zip(predictions, references)]
    return sum(scores) / len(scores)


def read_rows(folder: str | Path, table: str, fields: tuple[str, ...], limit: int) -> list[dict]:
    """The rows of `folder/table` (images under `folder/images`), the first `limit` images' (0: all)."""
    path = Path(folder) / table
    if not path.is_file():
        raise DataError(f"{folder} has no {table} (a folder as `tessera data synth-scenes` writes it)")
    rows, images = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in ("image", *fields)):
            raise DataError(f"{path}:{n}: a row needs string fields image, {', '.join(fields)}")
        if row["image"] not in images:
            if limit and len(images) == limit:
                continue
            images.append(row["image"])
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _pixels(folder: Path, name: str, cfg):
    path = folder / "images" / name
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return image_pixels(path.read_bytes(), str(path), cfg)[None]


def _generate(model, cfg, tokenizer, folder: Path, items: list[tuple[str, str]], batch_size: int, max_new: int):
    """Greedy answers of (image name, prompt) items."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = [_pixels(folder, name, cfg) for name, _ in chunk]
        out += answers(model, tokenizer, [p for _, p in chunk], pixels, max_new)
    return out


def caption_scores(model, cfg, tokenizer, folder: str | Path, batch_size: int = 16, limit: int = 0,
                   max_new_tokens: int = 64) -> dict:
    folder = Path(folder)
    refs: dict[str, list[str]] = defaultdict(list)
    for row in read_rows(folder, "captions.jsonl", ("caption",), limit):
        refs[row["image"]].append(row["caption"])
    names = list(refs)
    preds = _generate(model, cfg, tokenizer, folder, [(n, cfg.vlm.caption_prompt) for n in names], batch_size,
                      max_new_tokens)
    exact = sum(normalise(p) in {normalise(r) for r in refs[n]} for p, n in zip(preds, names)) / len(names)
    cider, _ = cider_d(preds, [refs[n] for n in names])
    return {"images": len(names), "exact_match": exact, "cider_d": cider, "meteor": meteor(preds, [refs[n] for n in names]),
            **text_metrics(preds, [refs[n][0] for n in names]), "examples": list(zip(names, preds))[:3]}


def vqa_scores(model, cfg, tokenizer, folder: str | Path, batch_size: int = 16, limit: int = 0,
               max_new_tokens: int = 16) -> dict:
    rows = read_rows(folder, "vqa.jsonl", ("question", "answer"), limit)
    items = [(r["image"], cfg.vlm.prompt.format(text=r["question"])) for r in rows]
    preds = _generate(model, cfg, tokenizer, Path(folder), items, batch_size, max_new_tokens)
    right = [normalise(p) == normalise(r["answer"]) for p, r in zip(preds, rows)]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(rows, right):
        by_kind[" ".join(r["question"].split()[:2])].append(ok)
    return {"questions": len(rows), "accuracy": sum(right) / len(rows),
            "by_question": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "examples": [(r["question"], p, r["answer"]) for r, p in zip(rows, preds)][:3]}
