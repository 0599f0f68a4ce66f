"""Peak memory growth of one training step of an 8-layer model at seq 512, for one AC mode.

Run in a fresh process (`python tests/ac_memory.py MODE`): the growth of the peak resident set
over the step is the activations plus gradients, which is what checkpointing trades for compute.
Prints a JSON object with the growth in bytes.
"""
from __future__ import annotations

import json
import sys

import torch

from tessera.core.config import ModelConfig
from tessera.core.metrics import peak_rss_bytes, reset_peak_rss, rss_bytes
from tessera.core.model import Transformer
from tessera.distributed.parallelize import apply_ac


def main(mode: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, n_layers=8, d_model=256, n_heads=4, max_seq_len=512)
    model = Transformer(cfg)
    apply_ac(model, mode, every=2)
    idx = torch.randint(0, cfg.vocab_size, (4, 512))
    reset_peak_rss()
    before = rss_bytes()
    model(idx, idx).backward()
    print(json.dumps({"mode": mode, "growth": peak_rss_bytes() - before}))


if __name__ == "__main__":
    main(sys.argv[1])
