"""CIDEr-D (Vedantam et al., 2015, as the COCO caption evaluation computes it), a pure function.

Each caption becomes, per n = 1..4, a vector of its n-gram counts weighted by tf-idf, the
document frequency counted over the images' reference sets. A candidate scores, per reference and
per n, the clipped cosine sum(min(c, r) * r) / (|c| |r|) times a Gaussian penalty on the length
difference (sigma 6); the mean over n and references, times 10, is the image's score, and the
corpus score is the mean over images. Text is lower-cased and split on whitespace after
punctuation is dropped (COCO's PTB tokenizer does the same for plain captions).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

N = 4
SIGMA = 6.0


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def ngrams(tokens: list[str]) -> list[Counter]:
    return [Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, N + 1)]


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, each image's score) of one candidate per image against its references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets: one of each per image")
    if not candidates or any(len(r) == 0 for r in references):
        raise ValueError("every image needs at least one reference caption")
    refs = [[ngrams(words(r)) for r in rs] for rs in references]
    df: Counter = Counter()
    for image in refs:
        df.update({g for ref in image for counts in ref for g in counts})
    log_images = math.log(len(refs))

    def vector(counts: list[Counter]) -> tuple[list[dict], list[float], int]:
        vec = [{g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in c.items()} for c in counts]
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec], sum(counts[0].values())

    scores = []
    for cand, image in zip(candidates, refs):
        c_vec, c_norm, c_len = vector(ngrams(words(cand)))
        total = 0.0
        for ref in image:
            r_vec, r_norm, r_len = vector(ref)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * SIGMA ** 2))
            for n in range(N):
                value = sum(min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in c_vec[n].items())
                if c_norm[n] and r_norm[n]:
                    value /= c_norm[n] * r_norm[n]
                total += value * penalty
        scores.append(10.0 * total / N / len(image))
    return sum(scores) / len(scores), scores
