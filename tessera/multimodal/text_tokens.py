"""Token ids for the texts of an image-text batch, added by the loader's `text_collate` inside
its workers: captions for a contrastive text tower, prompt + answer for an image-conditioned LM."""
from __future__ import annotations

import torch

from tessera.core.tokenizer import Tokenizer

IGNORE = -100  # a target the loss skips (the model's cross entropy ignore_index)


class CaptionTokens:
    """`input_ids` (B, max_len): each text's tokens then eos, cut to max_len (eos kept last),
    padded with the pad id; `attention_mask` (B, max_len) 1 on the real tokens."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be at least 2 (a token and eos)")
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, batch: dict) -> dict:
        tok = self.tokenizer
        rows = [ids[: self.max_len - 1] + [tok.eos_id] for ids in tok.encode_batch(batch["texts"])]
        ids = torch.full((len(rows), self.max_len), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.max_len), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {**batch, "input_ids": ids, "attention_mask": mask}


class PromptAnswerTokens:
    """`input_ids` = prompt tokens + answer tokens + eos, and `targets` = the next token on the
    answer (and eos) only, IGNORE elsewhere, both (B, L) padded to the longest row (at most
    max_len); `attention_mask` 1 on real tokens. Question/answer batches fill `prompt` with each
    question (`{text}`); caption batches have `caption_prompt` as prompt and the caption as answer."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, prompt: str = "{text}", caption_prompt: str = ""):
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be at least 2")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.prompt, self.caption_prompt = prompt, caption_prompt

    def __call__(self, batch: dict) -> dict:
        tok = self.tokenizer
        if "answers" in batch:
            prompts, answers = [self.prompt.format(text=t) for t in batch["texts"]], batch["answers"]
        else:
            prompts, answers = [self.caption_prompt] * len(batch["texts"]), batch["texts"]
        rows, n_prompt = [], []
        for p, a in zip(prompts, answers):
            head = tok.encode(p) if p else []
            rows.append((head + tok.encode(a) + [tok.eos_id])[: self.max_len])
            n_prompt.append(len(head))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, n_prompt)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            # position t predicts token t + 1: the targets of the positions before each answer token
            for t in range(max(n, 1) - 1, len(row) - 1):
                targets[i, t] = row[t + 1]
        return {**batch, "input_ids": ids, "targets": targets, "attention_mask": mask}
