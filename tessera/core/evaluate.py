"""Evaluation: perplexity of a checkpoint, BLEU and ROUGE of text (validation during training is the trainer's)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from tqdm import tqdm

from tessera.core.data import Manifest, ShardReader


@torch.no_grad()
def perplexity(model: torch.nn.Module, manifest: Manifest, split: str, seq_len: int, batch_size: int,
               device: torch.device, max_batches: int = 0, progress: bool = False) -> dict:
    """Token-weighted mean NLL and its exp over every full (seq_len + 1)-token window of a split,
    or over its first `max_batches` batches (0: all).

    Windows are cut consecutively from the split's shards in order; the last batch may be smaller.
    `progress` shows a progress bar of batches (stderr), its total known from the manifest.
    """
    if max_batches < 0:
        raise ValueError(f"max_batches={max_batches} must be >= 0 (0: the whole split)")
    model.eval()
    total_nll, total_tokens, done = 0.0, 0, 0
    shards = manifest.shards(split)
    windows = ShardReader(manifest).windows(shards, seq_len + 1)
    batches = -(-sum(s.tokens for s in shards) // (seq_len + 1) // batch_size)
    limit = min(batches, max_batches) if max_batches else batches
    with tqdm(total=limit, desc=f"perplexity ({split})", unit="batch", disable=not progress) as bar:
        while (not max_batches or done < max_batches) and (batch := list(itertools.islice(windows, batch_size))):
            data = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
            x, y = data[:, :-1], data[:, 1:]
            total_nll += model(x, y).double().item() * y.numel()
            total_tokens += y.numel()
            done += 1  # counted here: a disabled bar does not count
            bar.update()
    if not total_tokens:
        raise ValueError(f"the {split} split holds no window of {seq_len + 1} tokens")
    nll = total_nll / total_tokens
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": total_tokens}


def text_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu) and mean ROUGE-1/2/L F1 (rouge-score), line by line."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must pair up line by line")
    if not predictions:
        raise ValueError("no lines to score")
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(predictions, [references])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    rouge = {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
    return {"bleu": bleu.score, **rouge}
