"""Every Triton kernel compiles for sm_90 and sm_80 at every configuration the dispatch or the
autotuner can pick, proven on CPU (tessera.kernels.compile_check). Checked per compiled variant:
no compile error, shared memory within the architecture's per-block limit, no register spills in
bf16 on sm_90 (the training dtype and GPU) other than the known ones listed here, and the
attention dots are bf16 wgmma on sm_90 (tensor cores at the bf16 rate, not tf32 and not the
mma.sync fallback) and bf16 mma.sync on sm_80.

The default run compiles what trains on the GPU Tessera targets, bf16 on sm_90 (about half the
variants); `--runslow` compiles every variant for sm_90 and sm_80 in bf16 and fp32. Compiled
kernels are cached in .cache/triton (git-ignored): a cached run takes seconds, a cold one (a clean
clone) minutes on two cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ATTENTION_DOTS = {"fwd_kernel", "dkdv_kernel", "dq_kernel"}


def compile_rows(*args: str) -> list[dict]:
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton"))
    proc = subprocess.run([sys.executable, "-m", "tessera.kernels.compile_check", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def rows():
    """bf16 on sm_90: the variants the spill and wgmma checks are about."""
    return compile_rows("--arch", "90", "--dtype", "bf16")


def describe(r):
    return f"{r['kernel']} sm_{r['arch']} {r['label']} {r['config']}"


def check_compiled(rows, arches):
    from tessera.kernels.compile_check import SMEM_LIMIT

    assert {r["arch"] for r in rows} == set(arches)
    assert {"fwd_kernel", "dkdv_kernel", "dq_kernel", "delta_kernel", "_norm_fwd_kernel", "_norm_bwd_kernel",
            "_ce_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel"} <= {r["kernel"] for r in rows}
    windowed = {r["kernel"] for r in rows if "window=100" in r["label"]}
    assert ATTENTION_DOTS <= windowed  # the sliding-window variants are among those compiled
    errors = [f"{describe(r)}: {r['error'][:300]}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    over = [f"{describe(r)}: {r['smem']} B" for r in rows if r["smem"] > SMEM_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)


def test_every_bf16_variant_compiles_for_hopper(rows):
    check_compiled(rows, [90])
    assert {r["label"].split("dtype=")[1].split()[0] for r in rows} == {"bfloat16"}


@pytest.mark.slow
def test_every_variant_compiles_for_every_arch_and_dtype():
    from tessera.kernels.compile_check import SMEM_LIMIT

    every = compile_rows()
    check_compiled(every, list(SMEM_LIMIT))
    test_no_spills_in_bf16_on_hopper(every)
    test_hopper_attention_dots_are_bf16_wgmma(every)


def known_spill(r) -> bool:
    """dK/dV with a sliding window AND document/padding masks at D=128: every tile that keeps wgmma
    (64 or 128 keys) spills a few bytes (8-16 B with 64-key tiles, 72 B with 128); accepted and
    bounded here until the band's masks are restructured."""
    return (r["kernel"] == "dkdv_kernel" and "masked=True" in r["label"] and "D=128" in r["label"]
            and "window=0" not in r["label"] and r["spill_bytes"] <= 16)


def test_no_spills_in_bf16_on_hopper(rows):
    spilling = [f"{describe(r)}: {r['regs']} regs, {r['spill_bytes']} B local" for r in rows
                if r["arch"] == 90 and "dtype=bfloat16" in r["label"] and r.get("spill_bytes") and not known_spill(r)]
    assert not spilling, "\n".join(spilling)


def test_hopper_attention_dots_are_bf16_wgmma(rows):
    attention = [r for r in rows if r["kernel"] in ATTENTION_DOTS and "dtype=bfloat16" in r["label"]]
    assert attention
    for r in attention:
        kinds = r["mma"]
        if r["arch"] == 90:
            assert kinds and all(k.startswith("wgmma") and ".bf16.bf16" in k for k in kinds), (describe(r), kinds)
        else:
            assert kinds and all(k.startswith("mma.sync") and ".bf16.bf16" in k for k in kinds), (describe(r), kinds)
