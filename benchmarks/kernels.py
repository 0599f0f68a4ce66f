"""Kernel microbenchmarks: Tessera's Triton kernels against torch eager, torch.compile, SDPA
backends, and Liger-Kernel / flash-attn when installed.

    python benchmarks/kernels.py --out DIR            # full sizes, on a GPU
    python benchmarks/kernels.py --smoke --out DIR    # tiny sizes; runs on CPU (Triton interpreter)
    python benchmarks/kernels.py --once               # one small call of every kernel, fwd+bwd, no
                                                      # timing: what compute-sanitizer runs (gpu_suite.sh)

Per kernel and size: median time of forward + backward (and forward alone for attention); the
FLOPs and bytes each call must at least do are stated per case (attention: 4*B*H*S*S*D FLOPs
forward, halved when causal, x3.5 with the backward, which recomputes P; norms and
cross-entropy: the bytes of their minimal reads and writes), with the rates they imply, and the
peak memory of one call of the op alone (not do_bench's flush buffer). One JSON line per case
goes to results.jsonl as soon as it finishes (a timeout keeps what ran); results.json, .md and
.png are written at the end. Errors are kept whole in the JSON, one line in the table.
Timings under the interpreter measure nothing about speed: --smoke only keeps the harness alive.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
    unit: str  # the headline rate: "GB/s" (memory-bound kernels) or "TFLOP/s"
    flops: float  # per call
    bytes: float  # per call: the minimal reads and writes
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)


def peak_gb(fn: Callable[[], object]) -> float | None:
    """Memory one call allocates above what was live before it, in GB (CUDA only)."""
    if not CUDA:
        return None
    fn()  # first call: autotuning and compilation allocate too
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def measure(fn: Callable[[], object], reps: int) -> tuple[float, float | None]:
    """Median milliseconds per call, and the peak memory of one call measured apart."""
    mem = peak_gb(fn)
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), mem
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
    eager = {"layer_norm": lambda x, w: F.layer_norm(x, x.shape[-1:], w), "rms_norm": lambda x, w: F.rms_norm(x, x.shape[-1:], w)}
    cases = []
    for rows, n in sizes:
        for kind in ("layer_norm", "rms_norm"):
            x = torch.randn(rows, n, device=DEVICE, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
            # fwd reads x, writes y; bwd reads x, dy, writes dx: 5 rows; ~8 FLOPs per element each way.
            c = Case(kind, f"{rows}x{n}", "GB/s", 16 * rows * n, 5 * rows * n * x.element_size())
            for provider, fn in (("tessera", dispatch.implementation(kind, "triton")), ("torch", eager[kind]),
                                 ("torch.compile", compiled(eager[kind]))):
                c.providers[provider] = fwd_bwd(functools.partial(fn, x, w), [x, w])
            cases.append(c)
    return cases


def cross_entropy_cases(smoke: bool, dtype: torch.dtype) -> list[Case]:
    sizes = [(16, 1000)] if smoke else [(4096, 32000), (16384, 32000), (16384, 128256)]
    eager = lambda logits, targets: F.cross_entropy(logits.float(), targets)  # noqa: E731
    impls = {"tessera": dispatch.implementation("cross_entropy", "triton"), "torch": eager,
             "torch.compile": compiled(eager)}
    if liger_cross_entropy() is not None:
        impls["liger"] = liger_cross_entropy()
    cases = []
    for tokens, vocab in sizes:
        logits = torch.randn(tokens, vocab, device=DEVICE, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,), device=DEVICE)
        # read the logits, write their gradient; ~10 FLOPs per logit (max, exp, sum, softmax, grad).
        c = Case("cross_entropy", f"{tokens}x{vocab}", "GB/s", 10 * tokens * vocab, 2 * tokens * vocab * logits.element_size())
        for provider, fn in impls.items():
            c.providers[provider] = fwd_bwd(functools.partial(fn, logits, targets), [logits])
        cases.append(c)
    return cases


def _sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attention_cases(smoke: bool, dtype: torch.dtype) -> list[Case]:
    from torch.nn.attention import SDPBackend

    sizes = [(1, 2, 64, 32)] if smoke else [(8, 16, 1024, 128), (4, 16, 2048, 128), (2, 16, 4096, 128)]
    impls = {"tessera": functools.partial(dispatch.implementation("attention", "triton"), causal=True)}
    sdpa = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
    impls.update({name: functools.partial(_sdpa, backend=b) for name, b in sdpa.items() if not smoke or name == "sdpa-math"})
    if "flash_attn" in dispatch.available("attention"):
        impls["flash-attn"] = functools.partial(dispatch.implementation("attention", "flash_attn"), causal=True)
    cases = []
    for b, h, s, d in sizes:
        q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = 4 * b * h * s * s * d / 2  # two matmuls of 2*S*S*D FLOPs per head; causal: half the square
        io = 4 * b * h * s * d * q.element_size()  # read q, k, v; write o
        for mode, factor, io_factor in (("fwd", 1.0, 1.0), ("fwd+bwd", 3.5, 2.75)):
            c = Case(f"attention {mode}", f"{b}x{h}x{s}x{d}", "TFLOP/s", flops * factor, io * io_factor)
            for provider, fn in impls.items():
                call = functools.partial(fn, q, k, v)
                c.providers[provider] = no_grad(call) if mode == "fwd" else fwd_bwd(call, [q, k, v])
            cases.append(c)
    return cases


def run_cases(cases: list[Case], reps: int, log: Path) -> list[dict]:
    """Measure every provider of every case, appending each row to `log` (JSON lines) at once."""
    rows = []
    for case in cases:
        for provider, fn in case.providers.items():
            row = {"kernel": case.kernel, "size": case.size, "provider": provider, "flops": case.flops, "bytes": case.bytes}
            try:
                ms, mem = measure(fn, reps)
            except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"
            else:
                row.update(ms=ms, peak_gb=mem, **{"TFLOP/s": case.flops / ms / 1e9, "GB/s": case.bytes / ms / 1e6})
                print(f"{case.kernel:20s} {case.size:16s} {provider:15s} {ms:9.3f} ms  {row[case.unit]:9.2f} {case.unit}",
                      flush=True)
            row["unit"] = case.unit
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | size | provider | ms | rate | peak GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            first = r["error"].strip().splitlines()[0][:120] if r["error"].strip() else "error"
            lines.append(f"| {r['kernel']} | {r['size']} | {r['provider']} | error: {first} | | |")
            continue
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(f"| {r['kernel']} | {r['size']} | {r['provider']} | {r['ms']:.3f} | {r[r['unit']]:.1f} {r['unit']} | {peak} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({r["kernel"] for r in rows})
    fig, axes = plt.subplots(len(kernels), 1, figsize=(9, 3 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        ok = [r for r in rows if r["kernel"] == kernel and "error" not in r]
        unit = ok[0]["unit"] if ok else "TFLOP/s"
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


def run_once() -> None:
    """Every Triton kernel once, forward and backward, at small odd shapes with every mask kind:
    short enough for compute-sanitizer's memcheck and racecheck."""
    ops = {op: dispatch.implementation(op, "triton") for op in dispatch.OPS}
    for dtype in (torch.bfloat16, torch.float32):
        leaf = functools.partial(torch.randn, device=DEVICE, dtype=dtype, requires_grad=True)
        q, k, v = leaf(2, 4, 77, 64), leaf(2, 2, 77, 64), leaf(2, 2, 77, 64)
        doc = torch.repeat_interleave(torch.arange(3, device=DEVICE), torch.tensor([30, 20, 27], device=DEVICE))[None]
        pad = torch.ones(2, 77, dtype=torch.bool, device=DEVICE)
        pad[1, :9] = False
        for causal, d, p in ((True, None, None), (False, doc, pad), (True, doc, pad)):
            ops["attention"](q, k, v, causal, d, p).float().sum().backward()
        x, r, w, b = leaf(33, 300), leaf(33, 300), leaf(300), leaf(300)
        sum(t.float().sum() for t in ops["layer_norm"](x, w, b, 1e-5, r) + ops["rms_norm"](x, w, 1e-6, r)).backward()
        logits, targets = leaf(19, 1000), torch.randint(0, 1000, (19,), device=DEVICE)
        ops["cross_entropy"](logits, targets, -100, 0.1, 1e-3, "mean").backward()
        ops["linear_cross_entropy"](leaf(19, 64), leaf(1000, 64), targets).backward()
        cos, sin = torch.randn(1, 1, 77, 64, device=DEVICE), torch.randn(1, 1, 77, 64, device=DEVICE)
        ops["rope"](q, cos, sin).float().sum().backward()
        ops["swiglu"](leaf(5, 333), leaf(5, 333)).float().sum().backward()
    if CUDA:
        torch.cuda.synchronize()
    print("every kernel ran once, forward and backward")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU interpreter: checks the harness only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels"))
    ap.add_argument("--only", nargs="*", choices=["norms", "cross_entropy", "attention"])
    ap.add_argument("--once", action="store_true", help="each kernel once, no timing (for compute-sanitizer)")
    args = ap.parse_args(argv)
    if args.once:
        return run_once()
    if not CUDA and not args.smoke:
        ap.error("full sizes need a CUDA GPU; use --smoke on CPU")
    dtype = torch.bfloat16 if CUDA else torch.float32
    groups = {"norms": norm_cases, "cross_entropy": cross_entropy_cases, "attention": attention_cases}
    cases = [c for name, make in groups.items() if not args.only or name in args.only for c in make(args.smoke, dtype)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    rows = run_cases(cases, reps=2 if args.smoke else 10, log=out / "results.jsonl")
    meta = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)", "dtype": str(dtype),
            "smoke": args.smoke, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "results.md").write_text(f"Device: {meta['device']}, dtype {dtype}\n\n" + markdown(rows))
    plot(rows, out / "results.png")
    print(f"wrote {out}/results.jsonl, results.json, results.md, results.png")


if __name__ == "__main__":
    main()
