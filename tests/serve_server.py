"""A `tessera serve` process on a free loopback port, for the server tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tessera import kernels
from tessera.core.checkpoint import load_model_from_checkpoint
from tessera.core.config import ModelConfig
from tessera.core.generate import Sampling, generate_tokens
from tessera.core.model import Transformer

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_checkpoint(directory, tokenizer):
    """A small random Llama-style checkpoint with the char tokenizer in `directory`/step_000001."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                      max_seq_len=128, norm="rmsnorm", pos="rope", mlp="swiglu", init_std=0.3)
    ckpt = directory / "step_000001"
    ckpt.mkdir()
    save_model(Transformer(cfg), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(cfg.__dict__))
    tokenizer.save(ckpt)
    return ckpt


def start(ckpt, *args: str) -> tuple[subprocess.Popen, str]:
    """The server process (output piped) and its base URL, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TESSERA_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tessera", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--max-tokens", "40", "--max-prompt-tokens", "100", "--device", "cpu", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)


def expected_text(ckpt, tokenizer, prompt: str, max_tokens: int) -> str:
    """The greedy completion of `prompt` decoded alone, in this process: what the server must answer."""
    kernels.configure("torch")
    model = load_model_from_checkpoint(ckpt)
    ids = generate_tokens(model, [tokenizer.encode(prompt)], max_tokens, sampling=Sampling(temperature=0),
                          stop_ids=[tokenizer.eos_id])[0]
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids)
