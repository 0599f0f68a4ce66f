"""Scaling of the parallel layouts: tokens/s and per-rank peak memory at world sizes 1, 2 and 4.

One torchrun launch per world size (`python -m torch.distributed.run --standalone
--nproc_per_node N` of this script in `--worker` mode) trains every layout of that size in turn
on random tokens, `--warmup` untimed steps then `--steps` timed ones; a step is forward+backward,
global-norm clipping, the AdamW step and zero_grad, timed between two barriers (so it is the
slowest rank's step). tokens/s = global tokens per step / median step time. Per-rank peak memory
is the process's resident high-water mark (VmHWM) over the timed steps, reset after the warm-up;
the table shows the largest over ranks. World size 1 runs without torchrun or a process group.

    python benchmarks/scaling.py                       # CPU, worlds 1 2 4, -> results/scaling_cpu.json
    python benchmarks/scaling.py --smoke --out DIR     # tiny model, 2 steps, worlds 1 and 2 (the test)
    python benchmarks/scaling.py --model llama-1b --mfu   # one GPU, bf16 autocast, MFU

Layouts: single (1 process), ddp, fsdp (FSDP2), tp, tp_sp (TP + sequence parallel; both with
the vocab-parallel loss), fsdp_tp (2-D, world 4), hsdp (2 x 2, world 4) and DeepSpeed zero1/2/3. Micro-batch `--batch` per data-parallel rank,
so data-parallel layouts do weak scaling and TP layouts split one micro-batch's work.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera.core.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from tessera.core.engine import LocalEngine  # noqa: E402
from tessera.core.metrics import peak_flops, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402
from tessera.core.optim import build_optimizer  # noqa: E402

LAYOUTS = {  # name: (world sizes, ParallelConfig fields as a function of the world size)
    "single": ((1,), lambda w: None),
    "ddp": ((2, 4), lambda w: dict(dp_replicate=w, dp_shard=1)),
    "fsdp": ((2, 4), lambda w: dict(dp_shard=w)),
    "tp": ((2, 4), lambda w: dict(dp_shard=1, tp=w, sequence_parallel=False)),
    "tp_sp": ((2, 4), lambda w: dict(dp_shard=1, tp=w, sequence_parallel=True)),
    "fsdp_tp": ((4,), lambda w: dict(dp_shard=2, tp=2, sequence_parallel=True)),
    "hsdp": ((4,), lambda w: dict(dp_replicate=2, dp_shard=2)),
    # DeepSpeed last: ZeRO-3 patches torch functions for the rest of the process.
    "zero1": ((2, 4), lambda w: dict(engine="deepspeed", zero_stage=1)),
    "zero2": ((2, 4), lambda w: dict(engine="deepspeed", zero_stage=2)),
    "zero3": ((2, 4), lambda w: dict(engine="deepspeed", zero_stage=3)),
}
SIZES = {  # model name: ModelConfig fields (Llama-style), plus defaults for seq/batch
    "small": dict(vocab_size=2048, n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768),
    "tiny": dict(vocab_size=128, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128),
}
LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True)
OPTIM = OptimConfig(lr=1e-4, weight_decay=0.1)  # impl auto: fused AdamW on CPU/CUDA


def model_config(args) -> ModelConfig:
    if args.model in SIZES:
        fields = {**LLAMA, **SIZES[args.model]}
        if args.kv_heads:
            fields["n_kv_heads"] = args.kv_heads
    else:  # a preset of configs/models/
        path = ROOT / "configs" / "models" / f"{args.model}.toml"
        if not path.exists():
            raise SystemExit(f"--model {args.model}: no such size ({', '.join(SIZES)}) or preset in {path.parent}")
        fields = tomllib.loads(path.read_text())["model"]
    return ModelConfig(**{**fields, "max_seq_len": args.seq})


# ---------------------------------------------------------------------------------------------
# worker: runs inside each rank
# ---------------------------------------------------------------------------------------------

def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so that one layout's peak
    is not inflated by what the previous layout of the same launch left in the allocator."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def deepspeed_engine(model: Transformer, parallel: ParallelConfig, args, env, precision: str):
    import deepspeed

    from tessera.core.config import Config, TrainConfig
    from tessera.distributed.deepspeed_engine import DeepSpeedEngine, deepspeed_config

    cfg = Config(train=TrainConfig(batch_size=args.batch), optim=OPTIM, parallel=parallel)
    ds, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OPTIM, env.device),
                                  config=deepspeed_config(cfg, env.world_size))
    return DeepSpeedEngine(ds, env.device, precision)


def run_layout(name: str, cfg: ModelConfig, args, env) -> dict:
    """Train one layout on this rank; returns this rank's times and memory (or a skip reason)."""
    from tessera.distributed.engine import DistributedEngine
    from tessera.distributed.mesh import ParallelDims
    from tessera.distributed.parallelize import parallelize

    _release_memory()
    rss_before = rss_bytes()
    torch.manual_seed(0)
    fields = LAYOUTS[name][1](env.world_size)
    with torch.device(env.device):
        model = Transformer(cfg)
    precision = "bf16" if args.bf16 else "fp32"
    if fields is None:
        dp_rank, dp_size = 0, 1
        engine = LocalEngine(model, build_optimizer(model, OPTIM, env.device), env.device, precision)
    elif fields.get("engine") == "deepspeed":
        engine = deepspeed_engine(model, ParallelConfig(**fields), args, env, precision)
        dp_rank, dp_size = env.rank, env.world_size
    else:
        parallel = ParallelConfig(**fields)
        dims = ParallelDims.resolve(parallel, env.world_size)
        if dims.tp > 1 and (cfg.n_heads % dims.tp or cfg.kv_heads % dims.tp):
            return {"skipped": f"tp={dims.tp} must divide n_heads={cfg.n_heads} and n_kv_heads={cfg.kv_heads}"}
        try:
            parallelize(model, parallel, dims, dims.build_mesh(env.device.type))
        except ConfigError as e:
            return {"skipped": str(e)}
        engine = DistributedEngine(model, build_optimizer(model, OPTIM, env.device), env.device, precision)
        dp_rank, dp_size = dims.dp_rank(env.rank), dims.dp_size
    g = torch.Generator().manual_seed(1000 + dp_rank)  # the ranks of one TP group read the same batch
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(env.device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        _sync(env.device)
        start = time.perf_counter()
        engine.forward_backward((x, y))
        engine.clip_grad_norm(1.0)
        engine.step()
        engine.zero_grad()
        _sync(env.device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    reset_peak_rss()
    times = [step() for _ in range(args.steps)]
    out = {"times": times, "peak_rss": peak_rss_bytes(), "rss_before": rss_before,
           "global_tokens": args.batch * args.seq * dp_size, "dp_size": dp_size}
    if env.device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated(env.device)
    getattr(engine, "close", lambda: None)()  # DeepSpeed: its hooks and groups freed now, not at exit
    del engine, model, x, y, tokens
    _release_memory()
    return out


def worker(args) -> None:
    import torch.distributed as dist

    from tessera.distributed.env import exit_process, init_distributed

    env = init_distributed("cuda" if args.mfu else "cpu")
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // env.world_size)
    torch.set_num_threads(threads)
    cfg = model_config(args)
    rows = []
    for name, (worlds, _) in LAYOUTS.items():
        if env.world_size not in worlds or (args.layouts and name not in args.layouts):
            continue
        r = run_layout(name, cfg, args, env)
        gathered = [r]
        if dist.is_initialized():
            gathered = [None] * env.world_size
            dist.all_gather_object(gathered, r)
        if env.rank:
            continue
        row = {"world": env.world_size, "layout": name, "threads_per_rank": threads}
        if "skipped" in r:
            rows.append({**row, "skipped": r["skipped"]})
            print(f"world {env.world_size} {name}: skipped ({r['skipped']})", flush=True)
            continue
        step_times = [max(ts) for ts in zip(*(g["times"] for g in gathered))]  # slowest rank per step
        med = statistics.median(step_times)
        row.update(global_tokens_per_step=r["global_tokens"], dp_size=r["dp_size"],
                   step_times_s=step_times, median_step_s=med,
                   tokens_per_s=r["global_tokens"] / med, tokens_per_s_per_rank=r["global_tokens"] / med / env.world_size,
                   peak_mib_per_rank=[g["peak_rss"] / 2**20 for g in gathered],
                   rss_before_mib_per_rank=[g["rss_before"] / 2**20 for g in gathered])
        row["peak_mib_max"] = max(row["peak_mib_per_rank"])
        row["peak_over_before_mib_max"] = max((g["peak_rss"] - g["rss_before"]) / 2**20 for g in gathered)
        if "peak_cuda" in r:
            row["peak_cuda_mib_max"] = max(g["peak_cuda"] / 2**20 for g in gathered)
        rows.append(row)
        print(f"world {env.world_size} {name}: {row['tokens_per_s']:,.0f} tokens/s, "
              f"peak {row['peak_mib_max']:.0f} MiB", flush=True)
    if env.rank == 0:
        tmp = Path(args.worker_out + ".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, args.worker_out)  # the launcher takes the rows only when all of them were written
    exit_process(0)  # as `tessera train` ends: groups destroyed, exit handlers run, no teardown abort


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

def exit_failure(stderr: str) -> str:
    """The line that says why a rank died."""
    lines = [line for line in stderr.splitlines() if "terminate called" in line or "Error" in line]
    return lines[0].strip() if lines else "see the rank's stderr"


def launch(world: int, args, passthrough: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        script = [str(Path(__file__).resolve()), "--worker", "--worker-out", str(out), *passthrough]
        if world == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *script]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            env.pop(k, None)  # world 1 must not join a process group it finds in the environment
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=args.timeout)
        if proc.returncode != 0:  # an abort after the rows were written is a failure too (issue 16 item 7)
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"world {world}: launch failed with exit status {proc.returncode}: "
                             f"{exit_failure(proc.stderr)}")
        rows = json.loads(out.read_text())
        print(f"world {world}: {len(rows)} layouts in {time.perf_counter() - start:.1f} s (launch included)", flush=True)
        return rows


def mfu_rows(rows: list[dict], cfg: ModelConfig, args, peak: float | None) -> None:
    with torch.device("meta"):
        fpt = Transformer(cfg).flops_per_token(args.seq)
    for r in rows:
        if "tokens_per_s" in r:
            r["flops_per_token"] = fpt
            r["peak_flops"] = peak
            r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else None


def table(rows: list[dict], mfu: bool) -> str:
    head = "| world | layout | tokens/s | tokens/s per rank | peak MiB per rank (max) | peak - pre-build MiB (max) |"
    sep = "|---|---|---|---|---|---|"
    if mfu:
        head += " peak CUDA MiB | MFU |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['world']} | {r['layout']} | skipped: {r['skipped']} | | | |" + (" | |" if mfu else ""))
            continue
        line = (f"| {r['world']} | {r['layout']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_rank']:,.0f} "
                f"| {r['peak_mib_max']:,.0f} | {r['peak_over_before_mib_max']:,.0f} |")
        if mfu:
            m = r.get("mfu")
            line += f" {r.get('peak_cuda_mib_max', 0):,.0f} | {'n/a' if m is None else f'{100 * m:.1f}%'} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help=f"{', '.join(SIZES)} or a preset of configs/models/")
    ap.add_argument("--kv-heads", type=int, default=0, help="override n_kv_heads of a built-in size")
    ap.add_argument("--seq", type=int, help="sequence length (default 256; 2048 with --mfu)")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per data-parallel rank")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), help="only these layouts")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per rank (0: cores // world). Default 1, one core per rank: on a shared "
                         "2-core machine two intra-op threads made the single process 5-8x slower than one")
    ap.add_argument("--smoke", action="store_true", help="tiny model, seq 32, 1+2 steps, worlds 1 and 2")
    ap.add_argument("--mfu", action="store_true", help="one CUDA GPU, bf16 autocast, report MFU")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (implied by --mfu)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU when the GPU is not known")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory of the JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.seq, args.batch, args.warmup, args.steps = "tiny", 32, 2, 1, 2
        args.worlds = [w for w in args.worlds if w <= 2]
    if args.mfu:
        args.bf16, args.worlds, args.layouts = True, [1], ["single"]
    if args.seq is None:
        args.seq = 2048 if args.mfu else 256
    if args.worker:
        return worker(args)

    if args.mfu and not torch.cuda.is_available():
        raise SystemExit("--mfu needs a CUDA GPU")
    passthrough = [f"--model={args.model}", f"--kv-heads={args.kv_heads}", f"--seq={args.seq}",
                   f"--batch={args.batch}", f"--warmup={args.warmup}", f"--steps={args.steps}",
                   f"--threads={args.threads}"]
    passthrough += ["--bf16"] * args.bf16 + ["--mfu"] * args.mfu
    if args.layouts:
        passthrough += ["--layouts", *args.layouts]
    cores = len(os.sched_getaffinity(0))
    cfg = model_config(args)
    start = time.perf_counter()
    rows = [r for w in args.worlds for r in launch(w, args, passthrough)]
    wall = time.perf_counter() - start
    peak = None
    if args.mfu:
        peak = peak_flops(torch.device("cuda", 0), args.peak_tflops)
        mfu_rows(rows, cfg, args, peak)

    notes = [f"model {args.model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
             f"{cfg.kv_heads} kv heads, d_ff {cfg.ffn_dim}, vocab {cfg.vocab_size}; seq {args.seq}, "
             f"micro-batch {args.batch} per data-parallel rank, {'bf16 autocast' if args.bf16 else 'fp32'}, "
             f"{args.warmup} warm-up + {args.steps} timed steps (median)",
             f"{args.threads or 'cores // world'} torch thread(s) per rank",
             "peak MiB is the whole process's resident high-water mark (VmHWM: Python, torch, gloo buffers "
             "and what earlier layouts of the same launch left allocated included), max over ranks; "
             "peak - pre-build is that peak less the resident size just before the layout's model was built: "
             "model, gradients, optimizer state, activations and communication buffers"]
    device = torch.cuda.get_device_name(0) if args.mfu else f"CPU, {cores} cores"
    over = [w for w in args.worlds if w > cores and not args.mfu]
    if over:
        notes.append(f"world size {', '.join(map(str, over))} oversubscribes the {cores} CPU cores: ranks "
                     "time-share cores, so those rows measure contention, not scaling")
    result = {"device": device, "cores": cores, "torch": torch.__version__, "model": args.model,
              "model_config": cfg.__dict__, "seq": args.seq, "batch_per_dp_rank": args.batch,
              "warmup": args.warmup, "steps": args.steps, "precision": "bf16" if args.bf16 else "fp32",
              "wall_s": wall, "notes": notes, "rows": rows}
    print(f"\n{table(rows, args.mfu)}\n")
    for n in notes:
        print(f"- {n}")
    print(f"\ntotal {wall:.1f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"scaling_gpu_{args.model}.json" if args.mfu else "scaling_cpu.json"
    (out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
