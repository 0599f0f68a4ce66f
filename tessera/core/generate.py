"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded into one batch; a key-padding mask hides the
pads and each sequence's positions count from its own first token. Past the model's context
window the uncached path crops to the last `max_seq_len` tokens every step, and the cached
path rebuilds its cache from the last half window (so that each rebuild buys many cheap steps).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tessera.core.kv_cache import KVCache
from tessera.core.model import Transformer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks are for fixed-shape training steps, not a growing cache
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    pad_id: int = 0,
    seed: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every sequence (None once a sequence stopped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    window = model.cfg.max_seq_len
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(list(p), device=device)
        mask[i, longest - len(p):] = True
    tokens, mask = tokens[:, -window:], mask[:, -window:]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    cache, fed = None, 0  # fed: how many columns of `tokens` the cache already holds
    for _ in range(max_new_tokens):
        if use_cache and (cache is None or fed == window):
            if cache is not None:  # the window is full: keep its last half and rebuild
                tokens, mask = tokens[:, -(window // 2):], mask[:, -(window // 2):]
            heads = model.layers[0].attn.n_kv_heads  # those this process holds (a share under TP)
            cache = KVCache(model.cfg.n_layers, len(prompts), heads, model.cfg.head_dim, window,
                            device, next(model.parameters()).dtype)
            fed = 0
        if use_cache:
            new, pos = tokens[:, fed:], _positions(mask)[:, fed:]
            key_mask = None if mask.all() else mask
            logits = model(new, positions=pos, key_padding_mask=key_mask, cache=cache)[:, -1]
            fed = tokens.shape[1]
        else:
            tokens, mask = tokens[:, -window:], mask[:, -window:]
            key_mask = None if mask.all() else mask
            logits = model(tokens, positions=_positions(mask), key_padding_mask=key_mask)[:, -1]
        nxt = sample_next(logits, sampling, generator)
        out = [None if d else int(t) for t, d in zip(nxt.tolist(), done.tolist())]
        done |= torch.isin(nxt, stops)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)[:, None]], dim=1)
        yield out
        if bool(done.all()):
            return


def generate_tokens(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The generated continuation of every prompt (stop tokens included, nothing after them)."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate(model, prompts, max_new_tokens, **kwargs):
        for seq, t in zip(outs, step):
            if t is not None:
                seq.append(t)
    return outs
