"""Instruction data for supervised fine-tuning: JSONL in, masked and packed token batches out.

Two record formats, one per line:
    {"instruction": "...", "input": "...", "output": "..."}            (input optional)
    {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}   (last turn: assistant)
Both are rendered with the chat template stored with the tokenizer (`chat_template` in
`tokenizer_config.json`, Jinja as in Hugging Face; DEFAULT_CHAT_TEMPLATE when absent). The loss
is on the final assistant response and its end-of-sequence token only. Packed rows hold several
samples with document ids and per-sample positions, so samples never attend to each other and
a packed batch gives the same loss as the samples one per row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tessera.core.data.jsonl import read_records
from tessera.core.tokenizer import Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
IGNORE = -100


def chat_template(tokenizer_dir: str | Path | None) -> str:
    """The template saved with a tokenizer, or the default."""
    if tokenizer_dir is not None:
        config = Path(tokenizer_dir) / "tokenizer_config.json"
        if config.exists():
            return json.loads(config.read_text()).get("chat_template") or DEFAULT_CHAT_TEMPLATE
    return DEFAULT_CHAT_TEMPLATE


def render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def _messages(record: dict) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("'messages' must be a non-empty list of {role, content} strings")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's response")
        return messages
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"missing field(s) {missing}: a record needs 'messages', or 'instruction' and 'output'")
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    loss_mask: list[int]  # 1 where the token is part of the response (a target to learn)


def encode(tokenizer: Tokenizer, template: str, record: dict, seq_len: int) -> Sample:
    """Prompt and response tokens, the response (+ eos) marked for the loss; ValueError when it does not fit."""
    messages = _messages(record)
    prompt = render(template, messages[:-1], add_generation_prompt=True)
    full = render(template, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(full[len(prompt):]) + [tokenizer.eos_id]
    if len(prompt_ids) >= seq_len:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens and leaves no room for a response "
                         f"in train.seq_len={seq_len}")
    if len(prompt_ids) + len(response_ids) > seq_len + 1:
        raise ValueError(f"prompt + response are {len(prompt_ids) + len(response_ids)} tokens, longer than "
                         f"train.seq_len={seq_len} + 1")
    return Sample(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def read_sft(path: str | Path, tokenizer: Tokenizer, template: str, seq_len: int,
             on_error: str = "raise") -> tuple[list[Sample], int]:
    """Samples of a JSONL file and the number of lines skipped (`on_error="skip"`); errors name file and line."""
    return read_records(path, lambda record: encode(tokenizer, template, record, seq_len), on_error, "samples")


def pack(samples: list[Sample], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Rows of `seq_len` positions, each holding whole samples (first fit, in order).

    Every row: `inputs`, `targets` (IGNORE off the response), `positions` (from 0 per sample) and
    `doc_ids` (one per sample; padding gets its own id).
    """
    rows: list[list[Sample]] = []
    used: list[int] = []
    for s in samples:
        n = len(s.tokens) - 1
        if n > seq_len:
            raise ValueError(f"a sample of {n} positions does not fit a packed row of {seq_len} "
                             "(train.seq_len, or data.max_tokens)")
        for i, u in enumerate(used):
            if u + n <= seq_len:
                rows[i].append(s)
                used[i] += n
                break
        else:
            rows.append([s])
            used.append(n)
    return [_row(row, seq_len, pad_id) for row in rows]


def _row(samples: list[Sample], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    inputs, targets, positions, doc_ids = [], [], [], []
    for doc, s in enumerate(samples):
        n = len(s.tokens) - 1
        inputs += s.tokens[:-1]
        targets += [t if m else IGNORE for t, m in zip(s.tokens[1:], s.loss_mask[1:])]
        positions += range(n)
        doc_ids += [doc] * n
    pad = seq_len - len(inputs)
    return {
        "inputs": torch.tensor(inputs + [pad_id] * pad),
        "targets": torch.tensor(targets + [IGNORE] * pad),
        "positions": torch.tensor(positions + [0] * pad),  # within any context, however long the row
        "doc_ids": torch.tensor(doc_ids + [len(samples)] * pad),
    }


def batches(rows: list[dict[str, torch.Tensor]], batch_size: int, generator: torch.Generator | None = None):
    """Shuffled batches of packed rows, stacked (the last one may be smaller)."""
    order = torch.randperm(len(rows), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        yield {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}
