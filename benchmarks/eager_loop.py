"""The strongest plain eager fp32 training loop we know how to write, as the bar Tessera is measured against.

No Tessera in the hot path: the model is written for eager speed (one fused QKV matmul, one
fused gate/up matmul, `F.scaled_dot_product_attention` with is_causal, `F.rms_norm`/`F.layer_norm`,
RoPE tables built once), the batches are random windows of an in-memory token tensor (as
nanoGPT's), AdamW is torch's fused CPU/GPU kernel, the loss is read once per log interval. The
work is the recipe's (configs/recipes/shakespeare/train.toml): 4 layers, 4 heads, width 128, context 64,
batch 12, 2000 steps, cosine schedule, clipping, 20 validation batches every 250 steps.
Prints one JSON line. Only the prepared tokens are read with Tessera, once, before the clock starts.

    python benchmarks/eager_loop.py --arch gpt2     # LayerNorm, learned positions, GELU (nanoGPT's)
    python benchmarks/eager_loop.py --arch llama    # RMSNorm, RoPE, SwiGLU (the recipe's blocks)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "prepared" / "shakespeare_char"
sys.path.insert(0, str(ROOT))  # Tessera only to read the prepared tokens and, on request, its allocator setting


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, llama: bool):
        super().__init__()
        self.heads, self.llama = heads, llama
        self.norm1_w, self.norm2_w = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d_ff if llama else d_ff, bias=False)  # llama: gate and up in one matmul
        self.down = nn.Linear(d_ff, d, bias=False)

    def norm(self, x, w):
        return F.rms_norm(x, w.shape, w, 1e-5) if self.llama else F.layer_norm(x, w.shape, w, None, 1e-5)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x, self.norm1_w)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.llama:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        h = self.up(self.norm(x, self.norm2_w))
        if self.llama:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return x + self.down(h)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class GPT(nn.Module):
    def __init__(self, vocab: int, layers: int, heads: int, d: int, context: int, llama: bool):
        super().__init__()
        self.llama = llama
        self.tok = nn.Embedding(vocab, d)
        self.pos = None if llama else nn.Embedding(context, d)
        d_ff = 344 if llama else 4 * d
        self.blocks = nn.ModuleList(Block(d, heads, d_ff, llama) for _ in range(layers))
        self.norm_w = nn.Parameter(torch.ones(d))
        inv = 1.0 / 10000.0 ** (torch.arange(0, d // heads, 2).float() / (d // heads))
        ang = torch.arange(context).float()[:, None] * inv
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        s = idx.shape[1]
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos.weight[:s]
        cos, sin = self.cos[:s], self.sin[:s]
        for block in self.blocks:
            x = block(x, cos, sin)
        x = F.rms_norm(x, x.shape[-1:], self.norm_w, 1e-5) if self.llama else F.layer_norm(x, x.shape[-1:], self.norm_w, None, 1e-5)
        logits = x @ self.tok.weight.T  # tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def load_tokens() -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prepared train and validation tokens, and the vocabulary size."""
    from tessera.core.data import read_manifest
    from tessera.core.data.loader import ShardReader

    manifest = read_manifest(DATA)
    reader = ShardReader(manifest)
    train, val = (torch.from_numpy(np.concatenate(list(reader.tokens(list(manifest.shards(split))))).astype(np.int64))
                  for split in ("train", "val"))
    return train, val, manifest.vocab_size


def lr_at(step: int, steps: int, lr=1e-3, min_lr=1e-4, warmup=100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="the allocator setting Tessera applies on CPU (tessera.core.speed.retain_freed_memory)")
    args = ap.parse_args()
    if args.retain_freed_memory:
        from tessera.core.speed import retain_freed_memory

        retain_freed_memory()
    batch, context = 12, 64
    torch.manual_seed(1337)
    train, val, vocab = load_tokens()
    model = GPT(vocab, 4, 4, 128, context, args.arch == "llama")
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.tok.weight]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is model.tok.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=True)
    offsets = torch.arange(context + 1)
    val_windows = val[: (len(val) // (context + 1)) * (context + 1)].view(-1, context + 1)

    @torch.inference_mode()
    def evaluate() -> float:
        model.eval()
        losses = [model(w[:, :-1], w[:, 1:]).item() for w in val_windows[: args.eval_batches * batch].split(batch)]
        model.train()
        return sum(losses) / len(losses)

    train_time, timed_steps, evals, loss = 0.0, 0, [], float("nan")
    loop_start = time.perf_counter()
    for step in range(args.steps):
        started = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        windows = train[torch.randint(len(train) - context - 1, (batch,))[:, None] + offsets]
        out = model(windows[:, :-1], windows[:, 1:])
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0:
            loss = out.item()
        if step >= 10:  # the first steps warm up allocators and kernels
            train_time += time.perf_counter() - started
            timed_steps += 1
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evals.append(evaluate())
    end = time.perf_counter()
    print(json.dumps({
        "bench": "eager_loop", "arch": args.arch, "steps": args.steps, "threads": torch.get_num_threads(),
        "retain_freed_memory": args.retain_freed_memory,
        "wall_s_in_process": end - START, "loop_s": end - loop_start,
        "tokens_per_s": timed_steps * batch * context / train_time if timed_steps else None,
        "final_loss": loss, "val_loss": evals[-1],
    }))


if __name__ == "__main__":
    main()
