"""Peak memory of the LM-head loss: fused `linear_cross_entropy` against F.cross_entropy(h @ W.T).

    python benchmarks/memory_ce.py [--tokens 8192 --width 2048 --vocab 32000 128256]

Forward and backward at each vocabulary size. On a GPU: bf16, the Triton kernel, peak from
the CUDA allocator. On CPU: fp32, the chunked torch path, peak resident memory of a fresh
subprocess per case. Memory is counted above what the inputs already hold. Target: the fused
peak is at most 25% of the unfused one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera.core.metrics import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def one_case(mode: str, tokens: int, width: int, vocab: int) -> float:
    """Extra peak bytes of one forward + backward, in this process."""
    from tessera.kernels import dispatch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device).manual_seed(0)
    h = (torch.randn(tokens, width, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    w = (torch.randn(vocab, width, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    if mode == "fused":
        loss = dispatch.resolve("linear_cross_entropy", h.device)(h, w, t, -100)
    else:
        loss = F.cross_entropy((h @ w.T).float(), t)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_rss_bytes() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--case", nargs=2, metavar=("MODE", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: measure one case and print it
        print(one_case(args.case[0], args.tokens, args.width, int(args.case[1])))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    print(f"{args.tokens} tokens x width {args.width} on {device}\n")
    print("| vocab | unfused peak GB | fused peak GB | fused / unfused |\n|---|---|---|---|")
    for vocab in args.vocab:
        peaks = {}
        for mode in ("unfused", "fused"):
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--width", str(args.width),
                   "--case", mode, str(vocab)]
            peaks[mode] = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        ratio = peaks["fused"] / peaks["unfused"]
        rows.append({"vocab": vocab, "unfused_gb": peaks["unfused"] / 1e9, "fused_gb": peaks["fused"] / 1e9, "ratio": ratio})
        print(f"| {vocab} | {peaks['unfused'] / 1e9:.2f} | {peaks['fused'] / 1e9:.2f} | {100 * ratio:.1f}% |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "tokens": args.tokens, "width": args.width, "rows": rows}
    (out / f"memory_ce_{'cuda' if torch.cuda.is_available() else 'cpu'}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
