"""Compile every Triton kernel for a CUDA architecture ahead of time, on a machine without a GPU.

The public ops run on CPU tensors at representative training shapes with Triton's launcher
replaced by a recorder: each launch, and each autotune candidate the pruner keeps, is
specialised exactly as Triton's own launcher would (`create_function_from_signature`,
`_pack_args`), compiled by `triton.compile` for the target, and its cubin's resources read with
the cuobjdump that ships in the triton wheel. So what is checked is what the dispatch launches.

    python -m tessera.kernels.compile_check --arch 90 [--dtype bf16] [--jobs 2]    # a table; JSON with --json

Must run with TRITON_INTERPRET unset (tests/test_kernels_compile.py runs it in a subprocess).
Compiled kernels go to Triton's cache (TRITON_CACHE_DIR), so a second run only reads them back.
Written against triton 3.7's launcher internals; the kernels themselves also build on 3.6.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from tessera.kernels import attention_triton, cross_entropy_triton, norms_triton, rope_triton, swiglu_triton

# Largest shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_launches: list[tuple] = []


def _record(self, *args, grid, warmup, **kwargs):
    _launches.append((self, args, kwargs, _label()))


def _every_candidate(self, *args, **kwargs):
    """An autotuned launch becomes one launch per candidate that survives the pruner."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        self.fn.run(*args, **kwargs, **config.all_kwargs())


_context: dict[str, str] = {}


def _label() -> str:
    return " ".join(f"{k}={v}" for k, v in _context.items())


def _leaf(*shape, dtype):
    return torch.empty(*shape, dtype=dtype).requires_grad_()


def _attention_workloads(dtype):
    variants = [(causal, masked, 0) for causal in (True, False) for masked in (False, True)]
    variants += [(True, masked, 100) for masked in (False, True)]  # sliding window (Mistral), causal only
    for d in (64, 128):
        for causal, masked, window in variants:
            _context.update(op="attention", dtype=str(dtype)[6:], D=str(d), causal=str(causal), masked=str(masked),
                            window=str(window))
            q, k, v = (_leaf(2, h, 256, d, dtype=dtype) for h in (4, 2, 2))
            doc = torch.zeros(2, 256, dtype=torch.long) if masked else None
            kpm = torch.ones(2, 256, dtype=torch.bool) if masked else None
            out = attention_triton.attention_triton(q, k, v, causal, doc, kpm, window=window)
            out.backward(torch.empty(2, 4, 256, d, dtype=dtype))


def _other_workloads(dtype):
    for n in (1024, 4096, norms_triton.MAX_FEATURES):
        _context.update(op="norms", dtype=str(dtype)[6:], N=str(n))
        x, r, w, b = _leaf(64, n, dtype=dtype), _leaf(64, n, dtype=dtype), _leaf(n, dtype=dtype), _leaf(n, dtype=dtype)
        for out in (norms_triton.rms_norm_triton(x, w, residual=r), norms_triton.layer_norm_triton(x, w, b, residual=r),
                    (norms_triton.rms_norm_triton(x, w),)):
            torch.autograd.backward(out, [torch.empty_like(o) for o in out])
    _context.clear()
    _context.update(op="cross_entropy", dtype=str(dtype)[6:])
    logits = _leaf(64, 32000, dtype=dtype)
    targets = torch.zeros(64, dtype=torch.long)
    cross_entropy_triton.cross_entropy_triton(logits, targets).backward()
    cross_entropy_triton.cross_entropy_triton(logits.detach(), targets, reduction="none")
    cross_entropy_triton.linear_cross_entropy_triton(_leaf(64, 256, dtype=dtype), _leaf(1000, 256, dtype=dtype), targets)
    for d in (64, 128):
        _context.update(op="rope", dtype=str(dtype)[6:], D=str(d))
        x = _leaf(2, 4, 256, d, dtype=dtype)
        rope_triton.rope_triton(x, torch.empty(1, 1, 256, d), torch.empty(1, 1, 256, d)).backward(torch.empty_like(x))
    _context.clear()
    _context.update(op="swiglu", dtype=str(dtype)[6:])
    g, u = _leaf(4096, dtype=dtype), _leaf(4096, dtype=dtype)
    swiglu_triton.swiglu_triton(g, u).backward(torch.empty_like(g))


def record_launches(dtypes: Sequence[str]) -> list[tuple]:
    """Every (kernel, args, kwargs, label) the ops launch at the representative shapes in `dtypes`."""
    JITFunction.run, Autotuner.run = _record, _every_candidate
    _launches.clear()
    for dtype in (DTYPES[d] for d in dtypes):
        _context.clear()
        _attention_workloads(dtype)
        _context.clear()
        _other_workloads(dtype)
    return list(_launches)


def _resources(cubin: bytes) -> dict:
    """Registers and local memory (spills: Triton kernels keep no local arrays) from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"regs": int(fields["REG"]), "spill_bytes": max(int(fields["STACK"]), int(fields["LOCAL"]))}


def _specialise(fn, args, kwargs, target: GPUTarget):
    """(signature, constexprs, attrs, options) exactly as Triton's launcher derives them."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _compile_one(job: tuple) -> dict:
    index, arch = job
    fn, args, kwargs, label = _launches[index]
    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = _specialise(fn, args, kwargs, target)
    row = {"kernel": fn.__name__, "arch": arch, "label": label,
           "config": {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in kwargs}}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # reported per kernel, so one failure does not hide the others
        return {**row, "error": f"{type(e).__name__}: {e}"[:2000]}
    ptx = compiled.asm["ptx"]
    mma = sorted(set(re.findall(r"(wgmma\.mma_async\S*|mma\.sync\S*)", ptx)))
    return {**row, "smem": compiled.metadata.shared, **_resources(compiled.asm["cubin"]), "mma": mma}


def compile_all(arches: list[int], jobs: int, dtypes: Sequence[str] = tuple(DTYPES)) -> list[dict]:
    """One row per distinct compiled variant (launches that specialise alike are compiled once)."""
    launches = record_launches(dtypes)
    work, seen = [], set()
    for arch in arches:
        for i, (fn, args, kwargs, _) in enumerate(launches):
            key = (fn, arch, repr(_specialise(fn, args, kwargs, GPUTarget("cuda", arch, 32))))
            if key not in seen:
                seen.add(key)
                work.append((i, arch))
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:  # children share the recorded launches
        return pool.map(_compile_one, work, chunksize=1)


def table(rows: list[dict]) -> str:
    lines = ["| kernel | arch | variant | BLOCK_M x BLOCK_N, warps, stages | regs | spill B | smem KB | dots |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        cfg = f"{c.get('BLOCK_M', '')}x{c.get('BLOCK_N', '')}, {c.get('num_warps', '')}, {c.get('num_stages', '')}"
        if "error" in r:
            lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['label']} | {cfg} | error: {r['error'][:80]} | | | |")
            continue
        dots = ", ".join(sorted({m.split(".")[0] + "." + ".".join(m.split(".")[-3:-1]) for m in r["mma"]})) or "-"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['label']} | {cfg} | {r['regs']} | {r['spill_bytes']} | "
                     f"{r['smem'] / 1024:.1f} | {dots} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        raise SystemExit(2)
    rows = compile_all(args.arch, args.jobs, args.dtype)
    print(json.dumps(rows) if args.json else table(rows))


if __name__ == "__main__":
    main()
