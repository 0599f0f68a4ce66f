"""Token ids for the texts of an image-text batch, added by the loader's `text_collate` inside
its workers: captions for a contrastive text tower, prompt + answer for an image-conditioned LM."""
from __future__ import annotations

import torch

from tessera.core.tokenizer import Tokenizer

IGNORE = -100  # a target the loss skips (the model's cross entropy ignore_index)
IMAGE_MARKER = "<image>"  # where an image's tokens stand in an image-conditioned LM's prompt


def encode_with_images(tokenizer: Tokenizer, text: str, images: int, image_tokens: int) -> tuple[list[int], list[bool]]:
    """(token ids of `text` with each `<image>` marker replaced by `image_tokens` pad positions,
    True at those positions). The markers must match the `images` given, one each."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) - 1 != images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_MARKER} marker(s) for {images} image(s): "
                         f"put one {IMAGE_MARKER} where each image goes")
    ids, flags = [], []
    for i, piece in enumerate(pieces):
        if i:
            ids += [tokenizer.pad_id] * image_tokens
            flags += [True] * image_tokens
        head = tokenizer.encode(piece) if piece else []
        ids += head
        flags += [False] * len(head)
    return ids, flags


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
    question (`{text}`); caption batches have `caption_prompt` as prompt and the caption as answer.
    With `image_tokens` set, the prompt's `<image>` marker (one per row: its image) becomes that
    many positions, flagged in `image_mask` (B, L), for the image-conditioned LM to fill. L is
    rounded up to a multiple of `multiple` (sequence parallelism splits it over that many ranks;
    `max_len` must then be one too): the extra positions are padding, after every row's text."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, prompt: str = "{text}", caption_prompt: str = "",
                 image_tokens: int | None = None, multiple: int = 1):
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be at least 2")
        if max_len % multiple:
            raise ValueError(f"max_len={max_len} must be a multiple of {multiple}")
        self.tokenizer, self.max_len, self.multiple = tokenizer, max_len, multiple
        self.prompt, self.caption_prompt, self.image_tokens = prompt, caption_prompt, image_tokens

    def _prompt(self, text: str) -> tuple[list[int], list[bool]]:
        if self.image_tokens is None:
            head = self.tokenizer.encode(text) if text else []
            return head, [False] * len(head)
        head, flags = encode_with_images(self.tokenizer, text, 1, self.image_tokens)
        if len(head) >= self.max_len:
            raise ValueError(f"a prompt of {len(head)} positions (its image's included) leaves no room for the "
                             f"answer in max_len={self.max_len}")
        return head, flags

    def __call__(self, batch: dict) -> dict:
        tok = self.tokenizer
        if "answers" in batch:
            prompts, answers = [self.prompt.format(text=t) for t in batch["texts"]], batch["answers"]
        else:
            prompts, answers = [self.caption_prompt] * len(batch["texts"]), batch["texts"]
        rows, n_prompt, flags = [], [], []
        for p, a in zip(prompts, answers):
            head, image = self._prompt(p)
            rows.append((head + tok.encode(a) + [tok.eos_id])[: self.max_len])
            n_prompt.append(len(head))
            flags.append(image)
        width = -(-max(len(r) for r in rows) // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        image_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, n) in enumerate(zip(rows, n_prompt)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            image_mask[i, : len(flags[i])] = torch.tensor(flags[i], dtype=torch.bool)
            # position t predicts token t + 1: the targets of the positions before each answer token
            for t in range(max(n, 1) - 1, len(row) - 1):
                targets[i, t] = row[t + 1]
        extra = {"image_mask": image_mask} if self.image_tokens is not None else {}
        return {**batch, "input_ids": ids, "targets": targets, "attention_mask": mask, **extra}
