"""The README's recipe as a user runs it, against the strongest plain eager loop, on this machine.

Every row is a separate process timed from outside (start-up, data, evaluation, checkpoints and
compilation included), run back to back:

- eager_gpt2 / eager_llama: benchmarks/eager_loop.py, fp32 eager, nanoGPT's blocks and the recipe's;
- eager_gpt2_retain: the same loop given Tessera's CPU allocator setting (freed memory kept), so that
  no gain of Tessera's is a gain the baseline could not have had;
- recipe_cold: `tessera train configs/recipes/shakespeare/train.toml` with empty compile caches
  (fresh TESSERA_CACHE_DIR and TMPDIR, so torch's precompiled headers are rebuilt too);
- recipe_warm: the same command again, its caches now warm;
- recipe_fp32_eager: the recipe in fp32 without compilation, the reference of the loss curve;
- gpt2_fp32_eager: Tessera with nanoGPT's blocks, fp32, no compilation (the framework's own overhead);
- no_native_bf16: the recipe as `auto` resolves it on a CPU without native bf16 (fp32 + compile), cold caches.

Prints one JSON line per row, then a markdown table with the CPU (model and bf16 flags) beside it;
the same lines go to --out (recipe_speed.jsonl). Ratios are against the faster eager loop.

    python benchmarks/recipe_speed.py                  # the full comparison (~10 minutes on 2 cores)
    python benchmarks/recipe_speed.py --steps 50       # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import ensure_data  # noqa: E402
from tessera.core.metrics import read_metrics  # noqa: E402
from tessera.core.speed import CPU_BF16_FLAGS, cpu_flags  # noqa: E402

GPT2_BLOCKS = ["--model.norm=layernorm", "--model.pos=learned", "--model.mlp=gelu", "--model.d_ff=0"]


def cpu_description() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", *CPU_BF16_FLAGS, "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/bf16'}"


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def eager_row(arch: str, steps: int, env: dict, retain: bool = False) -> dict:
    flags = ["--arch", arch, *(["--retain-freed-memory"] if retain else [])]
    wall, out = timed([sys.executable, "benchmarks/eager_loop.py", *flags, "--steps", str(steps)], env)
    result = json.loads(out.strip().splitlines()[-1])
    return {"row": f"eager_{arch}" + ("_retain" if retain else ""), "wall_s": wall, "tokens_per_s": result["tokens_per_s"],
            "val_loss": result["val_loss"], "what": f"benchmarks/eager_loop.py {' '.join(flags)} (fp32 eager)"}


def tessera_row(name: str, overrides: list[str], steps: int, env: dict, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "tessera", "train", "configs/recipes/shakespeare/train.toml", f"--train.run_dir={json.dumps(str(run_dir))}",
           f"--train.steps={steps}", "--log.progress=false", *overrides]
    wall, out = timed(cmd, env)
    records = read_metrics(run_dir)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > min(100, steps // 2)]
    speed = next((line[len("speed: "):] for line in out.splitlines() if line.startswith("speed: ")), "")
    return {"row": name, "wall_s": wall, "tokens_per_s": statistics.median(rates) if rates else None,
            "losses": [r["loss"] for r in records if "loss" in r],
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1], "speed": speed,
            "what": "tessera train configs/recipes/shakespeare/train.toml " + " ".join(overrides)}


def fresh_env(cache_root: Path) -> dict:
    """An environment whose compile caches (Tessera's and torch's temporary ones) start empty."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    (cache_root / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(TESSERA_CACHE_DIR=str(cache_root / "tessera"), TMPDIR=str(cache_root / "tmp"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def table(rows: list[dict], cpu: str) -> str:
    base = min((r for r in rows if r["row"].startswith("eager_")), key=lambda r: r["wall_s"])
    lines = [f"CPU: {cpu}; reference: {base['row']} ({base['wall_s']:.1f} s, {base['tokens_per_s']:,.0f} tokens/s)", "",
             "| row | wall s | wall vs ref | tokens/s (steady) | tokens/s vs ref | val loss | what |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["tokens_per_s"] or float("nan")
        lines.append(f"| {r['row']} | {r['wall_s']:.1f} | {r['wall_s'] / base['wall_s']:.2f} | {rate:,.0f} | "
                     f"{rate / base['tokens_per_s']:.2f}x | {r['val_loss']:.4f} | {r['what']} {r.get('speed', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rows", nargs="+", default=["eager_gpt2", "eager_gpt2_retain", "eager_llama", "recipe_cold", "recipe_warm",
                                                   "recipe_fp32_eager", "gpt2_fp32_eager", "no_native_bf16"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    ensure_data()  # the recipe's prepared Tiny Shakespeare, as scripts/demo.sh makes it
    cpu = cpu_description()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-speed-") as tmp:
        tmp = Path(tmp)
        recipe_env, nobf16_env, plain_env = fresh_env(tmp / "recipe"), fresh_env(tmp / "nobf16"), fresh_env(tmp / "plain")
        plan = {
            "eager_gpt2": lambda: eager_row("gpt2", args.steps, plain_env),
            "eager_llama": lambda: eager_row("llama", args.steps, plain_env),
            "eager_gpt2_retain": lambda: eager_row("gpt2", args.steps, plain_env, retain=True),
            "recipe_cold": lambda: tessera_row("recipe_cold", [], args.steps, recipe_env, tmp / "run_cold"),
            "recipe_warm": lambda: tessera_row("recipe_warm", [], args.steps, recipe_env, tmp / "run_warm"),
            "recipe_fp32_eager": lambda: tessera_row("recipe_fp32_eager", ["--train.precision=fp32", "--train.compile=false"],
                                                     args.steps, plain_env, tmp / "run_fp32"),
            "gpt2_fp32_eager": lambda: tessera_row("gpt2_fp32_eager", [*GPT2_BLOCKS, "--train.precision=fp32",
                                                                       "--train.compile=false"], args.steps, plain_env, tmp / "run_gpt2"),
            "no_native_bf16": lambda: tessera_row("no_native_bf16", ["--train.precision=fp32"], args.steps, nobf16_env,
                                                  tmp / "run_nobf16"),
        }
        for name in args.rows:
            row = {**plan[name](), "steps": args.steps, "cpu": cpu}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe_speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if any(r["row"].startswith("eager_") for r in rows):
        print("\n" + table(rows, cpu))
    by_name = {r["row"]: r for r in rows}
    if "recipe_cold" in by_name and "recipe_fp32_eager" in by_name:
        gap = curve_gap(by_name["recipe_cold"]["losses"], by_name["recipe_fp32_eager"]["losses"])
        print(f"\nlargest gap between the recipe's loss curve and fp32 eager's (100-step means): {100 * gap:.2f}%")


def curve_gap(ours: list[float], reference: list[float], width: int = 10) -> float:
    """Largest relative difference of two loss curves (logged every 10 steps) averaged over `width` records."""
    means = [(statistics.fmean(ours[i:i + width]), statistics.fmean(reference[i:i + width]))
             for i in range(0, min(len(ours), len(reference)) - width + 1, width)]
    return max((abs(a - b) / b for a, b in means), default=float("nan"))


if __name__ == "__main__":
    main()
