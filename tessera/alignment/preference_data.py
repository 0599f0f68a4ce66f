"""Preference pairs for reward models and DPO: JSONL lines {"prompt", "chosen", "rejected"}.

The prompt is rendered as a user turn with the tokenizer's chat template, each response follows
it with an end-of-sequence token; a pair becomes two right-padded rows whose loss mask marks the
response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.alignment.sft_data import encode
from tessera.core.data.jsonl import read_records
from tessera.core.tokenizer import Tokenizer


@dataclass(frozen=True)
class Pair:
    chosen: tuple[list[int], list[int]]  # tokens, loss mask
    rejected: tuple[list[int], list[int]]
    ref_logps: tuple[float, float] | None = None  # the reference model's (chosen, rejected), when precomputed


def encode_pair(tokenizer: Tokenizer, template: str, record: dict, seq_len: int) -> Pair:
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"missing field(s) {missing}: a preference pair needs 'prompt', 'chosen' and 'rejected'")

    def side(response: str) -> tuple[list[int], list[int]]:
        s = encode(tokenizer, template, {"instruction": record["prompt"], "output": response}, seq_len)
        return s.tokens, s.loss_mask

    return Pair(side(record["chosen"]), side(record["rejected"]))


def read_pairs(path: str | Path, tokenizer: Tokenizer, template: str, seq_len: int,
               on_error: str = "raise") -> tuple[list[Pair], int]:
    return read_records(path, lambda record: encode_pair(tokenizer, template, record, seq_len), on_error, "pairs")


def collate(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """`tokens` and `loss_mask` (2B, S): the B chosen rows first, then the B rejected ones
    (and `ref_logps` (2B,) in the same order when the pairs carry them)."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(t) for t, _ in rows)
    tokens = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (t, m) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
        mask[i, : len(m)] = torch.tensor(m)
    batch = {"tokens": tokens, "loss_mask": mask}
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs])
    return batch
