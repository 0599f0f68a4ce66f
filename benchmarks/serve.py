"""Load test of `tessera serve` on loopback: requests/s and p50/p99 latency at 1, 8 and 32 clients.

    python benchmarks/serve.py [--ckpt CKPT] [--requests 64] [--max-tokens 32] [--out benchmarks/results]

Starts the server as its own process on 127.0.0.1 (a free port), then for each concurrency
level runs that many clients, each sending /v1/completions requests back to back (greedy,
--max-tokens new tokens, prompts cut from Tiny Shakespeare) until --requests have been
answered or --max-seconds pass. Without --ckpt the model is a randomly initialised one of the
Shakespeare recipe's shape (speed does not depend on the weights; greedy decoding of random
weights may stop early at eos, so token counts are reported too).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera.core.config import load_config, to_dict  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402
from tessera.core.tokenizer import train_char  # noqa: E402

CORPUS = ROOT / "data" / "tinyshakespeare.txt"


def random_checkpoint(work: Path) -> Path:
    from safetensors.torch import save_model

    tokenizer = train_char([CORPUS.read_text()])
    cfg = load_config(ROOT / "configs" / "recipes" / "shakespeare" / "train.toml", [f"--model.vocab_size={tokenizer.vocab_size}"]).model
    torch.manual_seed(0)
    ckpt = work / "step_000000"
    ckpt.mkdir()
    save_model(Transformer(cfg), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    tokenizer.save(ckpt)
    return ckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, max_batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tessera", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--device", "cpu", "--max-batch", str(max_batch)],
                            cwd=ROOT, env={**os.environ, "TESSERA_API_KEY": ""}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up")


async def load(base: str, clients: int, requests: int, max_tokens: int, max_seconds: float) -> dict:
    text = CORPUS.read_text()
    latencies: list[float] = []
    tokens = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal issued, tokens
        while issued < requests and time.perf_counter() < deadline:
            offset = 997 * issued % (len(text) - 100)
            issued += 1
            body = {"prompt": text[offset:offset + 16], "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            r = await c.post(f"{base}/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "seconds": wall, "req_per_s": len(latencies) / wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=60, help="per concurrency level")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(Path(tmp))
        port = free_port()
        proc = start_server(ckpt, port, args.max_batch)
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(load(base, 1, 2, args.max_tokens, 30))  # warm-up
            rows = []
            for clients in args.clients:
                rows.append(asyncio.run(load(base, clients, max(args.requests, clients), args.max_tokens, args.max_seconds)))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print("| clients | requests | req/s | tokens/s | p50 latency s | p99 latency s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "serve_cpu.json").write_text(json.dumps({"max_tokens": args.max_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
