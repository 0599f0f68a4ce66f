"""Retrieval and zero-shot metrics of paired embeddings, as pure functions of similarity scores.

Recall@K counts a query as found when any item relevant to it ranks among its K most similar;
relevance is a boolean matrix, so that identical captions of different images (frequent in
generated scenes) all count as right answers rather than all but one as wrong.
"""
from __future__ import annotations

import torch


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, torch.Tensor]:
    """{k: fraction of queries (rows of `similarity`, (Q, G)) with a relevant item among their top k}.

    Ties are broken against the query: an irrelevant item scored equal to the best relevant one
    ranks first. k above G is clamped to G."""
    best_relevant = similarity.masked_fill(~relevant, float("-inf")).max(dim=1).values
    rank = ((similarity >= best_relevant[:, None]) & ~relevant).sum(dim=1)  # irrelevant items at or above it
    found = relevant.any(dim=1)
    return {k: ((rank < min(k, similarity.shape[1])) & found).float().mean() for k in ks}


def image_text_recall(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, torch.Tensor]:
    """Image->text and text->image Recall@K of L2-normalised embeddings (N, D) of N pairs; pairs with
    the same `caption_ids` share their caption, so either of them is a right answer."""
    similarity = image @ text.T
    relevant = caption_ids[:, None] == caption_ids[None, :]
    i2t, t2i = recall_at_k(similarity, relevant, ks), recall_at_k(similarity.T, relevant.T, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def zero_shot_accuracy(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of images (N, D) whose most similar class embedding (C, D) is their label (N,)."""
    return ((image @ classes.T).argmax(dim=1) == labels).float().mean()
