"""What optimizer offload (`parallel.offload_optimizer="cpu"`, FSDP2's CPUOffloadPolicy) takes off the
accelerator: per rank, the bytes of parameter shards, gradients and AdamW state, and where they live.

One torchrun launch of 2 ranks (gloo on CPU, NCCL on GPUs) per setting, none then cpu; each rank
builds the model through Tessera's own placement (`ParallelPlacement.prepare` and `.engine`, as
`tessera train` does), takes `--warmup` steps on random tokens, then `--steps` timed ones.

What the figures mean:
- `device_resident_mib`: parameter shards + gradients + optimizer state that stay on the compute
  device between steps: all of them without offload, none with it (read from FSDP2's own per-
  parameter `offload_to_cpu` flag, not assumed). This is the "accelerator-side" residency offload
  removes; the all-gathered block in use during forward/backward comes on top in both settings.
- `peak_rss_mib`: the process's resident high-water mark over the timed steps. On a CPU the host
  *is* the device, so offload cannot lower it (it adds host copies): the CPU figure is the
  residency above, not a saving of RAM. On CUDA `peak_cuda_mib` (max_memory_allocated) is the
  measured accelerator peak.

    python benchmarks/offload_memory.py                   # -> benchmarks/results/offload_memory_cpu.json
    python benchmarks/offload_memory.py --smoke --out DIR # tiny model, 1 step (the test)
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scaling import LLAMA, SIZES  # noqa: E402
from tessera.core.config import Config, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from tessera.core.metrics import peak_rss_bytes, reset_peak_rss  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402

MIB = 2**20


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def residency(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's parameter, gradient and optimizer-state bytes, and whether FSDP2 offloaded them."""
    from torch.distributed.fsdp import FSDPModule

    flags = [p.offload_to_cpu for m in model.modules() if isinstance(m, FSDPModule)
             for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]
    params = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    out = {"param_mib": sum(local_bytes(p) for p in params) / MIB,
           "grad_mib": sum(local_bytes(p.grad) for p in params if p.grad is not None) / MIB,
           "optim_mib": sum(local_bytes(t) for t in state) / MIB,
           "offloaded": bool(flags) and all(flags),
           "devices": sorted({str((p.to_local() if hasattr(p, "to_local") else p).device) for p in params})}
    total = out["param_mib"] + out["grad_mib"] + out["optim_mib"]
    out["device_resident_mib"], out["host_resident_mib"] = (0.0, total) if out["offloaded"] else (total, 0.0)
    return out


def worker(args) -> None:
    import torch.distributed as dist

    from tessera.distributed.env import destroy, init_distributed
    from tessera.distributed.mesh import ParallelDims
    from tessera.distributed.placement import ParallelPlacement

    env = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.world_size))
    model_cfg = ModelConfig(**{**LLAMA, **SIZES[args.model], "max_seq_len": args.seq})
    cfg = Config(model=model_cfg, train=TrainConfig(batch_size=args.batch, seq_len=args.seq),
                 parallel=ParallelConfig(dp_shard=env.world_size, offload_optimizer=args.offload))
    placement = ParallelPlacement(env, ParallelDims.resolve(cfg.parallel, env.world_size))
    placement.check(cfg)
    torch.manual_seed(0)
    engine = placement.engine(placement.prepare(Transformer(model_cfg).to(env.device), cfg), cfg)
    g = torch.Generator().manual_seed(1000 + env.rank)
    tokens = torch.randint(0, model_cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(env.device)

    def step(keep_grads: bool = False) -> float:
        dist.barrier()
        start = time.perf_counter()
        engine.forward_backward((tokens[:, :-1], tokens[:, 1:]))
        engine.clip_grad_norm(1.0)
        engine.step()
        if not keep_grads:
            engine.zero_grad()
        dist.barrier()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    reset_peak_rss()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    times = [step(keep_grads=i == args.steps - 1) for i in range(args.steps)]
    row = {**residency(engine.model, engine.optimizer), "peak_rss_mib": peak_rss_bytes() / MIB,
           "median_step_s": statistics.median(times)}
    if env.device.type == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated(env.device) / MIB
    rows = [None] * env.world_size
    dist.all_gather_object(rows, row)
    if env.rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    destroy()


def launch(offload: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}",
               str(Path(__file__).resolve()), "--worker", "--worker-out", str(out), "--offload", offload,
               "--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=args.timeout)
        if not out.exists():
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"offload={offload}: launch failed with exit status {proc.returncode}")
        return json.loads(out.read_text())


def table(result: dict) -> str:
    head = f"{'offload':8} {'params':>8} {'grads':>8} {'optim':>8} {'on device':>10} {'on host':>8} {'peak RSS':>9} {'step s':>7}"
    lines = [f"FSDP2 over {result['world']} ranks, model {result['model']}, MiB per rank (largest rank)", head,
             "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['offload']:8} {r['param_mib']:8.2f} {r['grad_mib']:8.2f} {r['optim_mib']:8.2f} "
                     f"{r['device_resident_mib']:10.2f} {r['host_resident_mib']:8.2f} {r['peak_rss_mib']:9.1f} "
                     f"{r['median_step_s']:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--offload", choices=["none", "cpu"], default="none", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=sorted(SIZES), default="small")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--smoke", action="store_true", help="tiny model, one step: that the script runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.model, args.seq, args.batch, args.warmup, args.steps = "tiny", 16, 2, 0, 1
    rows = []
    for offload in ("none", "cpu"):
        ranks = launch(offload, args)
        worst = max(ranks, key=lambda r: r["param_mib"] + r["grad_mib"] + r["optim_mib"])
        rows.append({**worst, "offload": offload, "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
                     "per_rank": ranks})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"model": args.model, "world": args.world, "seq": args.seq, "batch": args.batch, "device": device,
              "rows": rows, "note": __doc__.split("What the figures mean:")[1].split("    python")[0].strip()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"offload_memory_{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
