"""Kernel microbenchmarks: Tessera's Triton kernels against torch eager, torch.compile, SDPA
backends, and Liger-Kernel / flash-attn when installed.

    python benchmarks/kernels.py --out DIR            # full sizes, on a GPU
    python benchmarks/kernels.py --smoke --out DIR    # tiny sizes; runs on CPU (Triton interpreter)

Per kernel and size: median time of forward + backward (and forward alone for attention),
achieved GB/s (norms, cross-entropy) or TFLOP/s (attention, causal FLOPs counted as half of
the full square), and peak memory. Writes results.json, results.md and results.png into DIR.
Timings under the interpreter measure nothing about speed: --smoke only keeps the harness alive.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before tessera.kernels imports triton

import torch.nn.functional as F  # noqa: E402

from tessera.kernels import dispatch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@dataclass
class Case:
    kernel: str
    size: str
    unit: str  # "GB/s" or "TFLOP/s"
    work: float  # bytes or FLOPs per call
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)


def measure(fn: Callable[[], object], reps: int) -> tuple[float, float | None]:
    """Median milliseconds per call and peak memory (GB) above what was allocated before."""
    if CUDA:
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return ms, (torch.cuda.max_memory_allocated() - base) / 1e9
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    def run():
        for t in inputs:
            t.grad = None
        out = forward()
        (out if out.dim() == 0 else out.float().sum()).backward()
    return run


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False) if CUDA else fn


def liger_cross_entropy() -> Callable | None:
    with contextlib.suppress(ImportError):
        from liger_kernel.transformers.functional import liger_cross_entropy

        return liger_cross_entropy
    return None


def norm_cases(smoke: bool, dtype: torch.dtype) -> list[Case]:
    sizes = [(64, 256)] if smoke else [(16384, 1024), (16384, 2048), (16384, 4096)]
    cases = []
    for rows, n in sizes:
        for kind in ("layer_norm", "rms_norm"):
            x = torch.randn(rows, n, device=DEVICE, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
            eager = (lambda: F.layer_norm(x, (n,), w)) if kind == "layer_norm" else (lambda: F.rms_norm(x, (n,), w))
            ours = dispatch.implementation(kind, "triton")
            c = Case(kind, f"{rows}x{n}", "GB/s", 5 * rows * n * x.element_size())  # fwd: x, y; bwd: x, dy, dx
            c.providers["tessera"] = fwd_bwd(lambda: ours(x, w), [x, w])
            c.providers["torch"] = fwd_bwd(eager, [x, w])
            c.providers["torch.compile"] = fwd_bwd(compiled(eager), [x, w])
            cases.append(c)
    return cases


def cross_entropy_cases(smoke: bool, dtype: torch.dtype) -> list[Case]:
    sizes = [(16, 1000)] if smoke else [(4096, 32000), (16384, 32000), (16384, 128256)]
    ours = dispatch.implementation("cross_entropy", "triton")
    cases = []
    for tokens, vocab in sizes:
        logits = torch.randn(tokens, vocab, device=DEVICE, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,), device=DEVICE)
        eager = lambda: F.cross_entropy(logits.float(), targets)  # noqa: E731
        c = Case("cross_entropy", f"{tokens}x{vocab}", "GB/s", 2 * tokens * vocab * logits.element_size())
        c.providers["tessera"] = fwd_bwd(lambda: ours(logits, targets), [logits])
        c.providers["torch"] = fwd_bwd(eager, [logits])
        c.providers["torch.compile"] = fwd_bwd(compiled(eager), [logits])
        liger = liger_cross_entropy()
        if liger is not None:
            c.providers["liger"] = fwd_bwd(lambda: liger(logits, targets), [logits])
        cases.append(c)
    return cases


def attention_cases(smoke: bool, dtype: torch.dtype) -> list[Case]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sizes = [(1, 2, 64, 32)] if smoke else [(8, 16, 1024, 128), (4, 16, 2048, 128), (2, 16, 4096, 128)]
    ours = dispatch.implementation("attention", "triton")
    sdpa = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
    cases = []
    for b, h, s, d in sizes:
        q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = 4 * b * h * s * s * d / 2  # causal: half of the square
        for mode, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            c = Case(f"attention {mode}", f"{b}x{h}x{s}x{d}", "TFLOP/s", flops * factor)

            def bench(fn, mode=mode):
                return no_grad(fn) if mode == "fwd" else fwd_bwd(fn, [q, k, v])

            c.providers["tessera"] = bench(lambda: ours(q, k, v, True))
            for name, backend in sdpa.items():
                if smoke and name != "sdpa-math":
                    continue

                def run(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                c.providers[name] = bench(run)
            if "flash_attn" in dispatch.available("attention"):
                fa = dispatch.implementation("attention", "flash_attn")
                c.providers["flash-attn"] = bench(lambda: fa(q, k, v, True))
            cases.append(c)
    return cases


def run_cases(cases: list[Case], reps: int) -> list[dict]:
    rows = []
    for case in cases:
        for provider, fn in case.providers.items():
            try:
                ms, mem = measure(fn, reps)
            except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
                rows.append({"kernel": case.kernel, "size": case.size, "provider": provider, "error": str(e)[:200]})
                continue
            rate = case.work / (ms * 1e-3) / (1e9 if case.unit == "GB/s" else 1e12)
            rows.append({"kernel": case.kernel, "size": case.size, "provider": provider, "ms": ms,
                         case.unit: rate, "peak_gb": mem})
            print(f"{case.kernel:20s} {case.size:16s} {provider:15s} {ms:9.3f} ms  {rate:9.2f} {case.unit}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | size | provider | ms | rate | peak GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['size']} | {r['provider']} | error: {r['error']} | | |")
            continue
        unit = "GB/s" if "GB/s" in r else "TFLOP/s"
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(f"| {r['kernel']} | {r['size']} | {r['provider']} | {r['ms']:.3f} | {r[unit]:.1f} {unit} | {peak} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({r["kernel"] for r in rows})
    fig, axes = plt.subplots(len(kernels), 1, figsize=(9, 3 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        ok = [r for r in rows if r["kernel"] == kernel and "error" not in r]
        unit = "GB/s" if ok and "GB/s" in ok[0] else "TFLOP/s"
        for provider in sorted({r["provider"] for r in ok}):
            pts = [(r["size"], r[unit]) for r in ok if r["provider"] == provider]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider)
        ax.set_title(kernel)
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU interpreter: checks the harness only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels"))
    ap.add_argument("--only", nargs="*", choices=["norms", "cross_entropy", "attention"])
    args = ap.parse_args(argv)
    if not CUDA and not args.smoke:
        ap.error("full sizes need a CUDA GPU; use --smoke on CPU")
    dtype = torch.bfloat16 if CUDA else torch.float32
    groups = {"norms": norm_cases, "cross_entropy": cross_entropy_cases, "attention": attention_cases}
    cases = [c for name, make in groups.items() if not args.only or name in args.only for c in make(args.smoke, dtype)]
    rows = run_cases(cases, reps=2 if args.smoke else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)", "dtype": str(dtype),
            "smoke": args.smoke, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "results.md").write_text(f"Device: {meta['device']}, dtype {dtype}\n\n" + markdown(rows))
    plot(rows, out / "results.png")
    print(f"wrote {out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
