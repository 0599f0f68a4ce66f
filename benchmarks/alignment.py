"""Speed and peak memory of alignment steps: DPO (reference log-probs precomputed, or from a
reference model every step) and PPO (`PPOTrainer.step`), with the share of PPO time spent
generating rollouts.

    python benchmarks/alignment.py [--smoke] [--threads 1] [--device cpu] [--out benchmarks/results]

A randomly initialised Llama-style model (RMSNorm, RoPE, SwiGLU, GQA) on random tokens: speed and
memory do not depend on the weights. PPO samples without an eos, so every response has exactly
`new_tokens` tokens and every step does the same work. Each case runs in a fresh process, so one
case's freed memory cannot hide or inflate another's peak (CPU: the process's peak resident
memory, VmHWM; CUDA: `torch.cuda.max_memory_allocated`). The warm-up step counts for memory (it
allocates the optimizer state) but not for time; a step's time is the median of the measured
steps, the shares of PPO time are over all of them. `cpu_per_wall` (CPU seconds of the process
per wall second over the measured steps; about `--threads` on an idle machine) says how much of
the machine the run had. The generation share is measured from outside:
`tessera.alignment.rollout.generate_tokens` and the trainer's `collect`/`update` are wrapped with
timers. Bounded: 1 to 2 minutes on 2 busy CPU cores; `--smoke` takes seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera.alignment import rollout  # noqa: E402
from tessera.alignment.dpo import dpo_step_loss, precompute_reference  # noqa: E402
from tessera.alignment.ppo import PPOTrainer, ValueModel  # noqa: E402
from tessera.alignment.preference_data import Pair, collate  # noqa: E402
from tessera.core.config import AlignConfig, ModelConfig, RLConfig  # noqa: E402
from tessera.core.metrics import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402

SIZES = {
    "full": {"model": {"n_layers": 4, "d_model": 256, "n_heads": 4, "n_kv_heads": 2, "d_ff": 688, "max_seq_len": 256,
                       "vocab_size": 512},
             "pairs": 8, "prompt_len": 32, "response_len": 96,
             "rollout_batch": 16, "mini_batch": 8, "ppo_epochs": 2, "new_tokens": 64, "warmup": 1, "steps": 5},
    "smoke": {"model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 48,
                        "vocab_size": 64},
              "pairs": 2, "prompt_len": 8, "response_len": 8,
              "rollout_batch": 4, "mini_batch": 2, "ppo_epochs": 1, "new_tokens": 8, "warmup": 1, "steps": 1},
}
CASES = {"dpo_precomputed": "DPO, reference log-probs precomputed",
         "dpo_reference_model": "DPO, reference model every step",
         "ppo": "PPO (`PPOTrainer.step`)"}
PAD = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak memory from `start()`: resident memory of the process on CPU, allocated memory on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else rss_bytes()

    def start(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        self.base = self._now()

    def report(self) -> dict[str, float]:
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss_bytes()
        return {"peak_gb": peak / 1e9, "base_gb": self.base / 1e9, "above_base_gb": (peak - self.base) / 1e9}


def new_model(size: dict, seed: int, device: torch.device) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(norm="rmsnorm", pos="rope", mlp="swiglu", **size["model"])
    return Transformer(cfg).to(device)


def random_tokens(n: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=generator).tolist()  # 0 is the padding id


def preference_batches(size: dict, n: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`n` collated batches of random pairs: a shared prompt and two responses of the same length."""
    g, vocab = torch.Generator().manual_seed(0), size["model"]["vocab_size"]
    mask = [0] * size["prompt_len"] + [1] * size["response_len"]
    batches = []
    for _ in range(n):
        pairs = []
        for _ in range(size["pairs"]):
            prompt = random_tokens(size["prompt_len"], vocab, g)
            chosen, rejected = (prompt + random_tokens(size["response_len"], vocab, g) for _ in range(2))
            pairs.append(Pair((chosen, mask), (rejected, mask)))
        batches.append({k: v.to(device) for k, v in collate(pairs, PAD).items()})
    return batches


def run_dpo(size: dict, device: torch.device, reference_model: bool) -> dict:
    memory = Memory(device)
    policy = new_model(size, 0, device)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    batches = preference_batches(size, size["warmup"] + size["steps"], device)
    extra = {}
    if not reference_model:
        sync(device)
        start = time.perf_counter()
        precompute_reference(reference, batches)
        sync(device)
        extra["reference_pass_tokens_per_s"] = sum(b["tokens"].numel() for b in batches) / (time.perf_counter() - start)
        reference = None  # the point of precomputing: the reference's memory is free for the run
    memory.start()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
    cfg = AlignConfig()
    times, cpu = [], []
    for i, batch in enumerate(batches):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, _ = dpo_step_loss(policy, batch, cfg, reference)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= size["warmup"]:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    step_s = statistics.median(times)
    tokens = batches[0]["tokens"].numel()  # every position is a real token (no padding)
    return {"tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "cpu_per_wall": sum(cpu) / sum(times), **memory.report(), **extra}


class Timer:
    """Wraps a function and adds the seconds spent inside it to `total`."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.total = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.total += time.perf_counter() - start
        return out


def run_ppo(size: dict, device: torch.device) -> dict:
    memory = Memory(device)
    policy = new_model(size, 0, device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value_model = ValueModel(new_model(size, 1, device)).to(device)
    opt = torch.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=1e-5, weight_decay=0.0)
    cfg = RLConfig(rollout_batch=size["rollout_batch"], mini_batch_size=size["mini_batch"], epochs=size["ppo_epochs"],
                   max_new_tokens=size["new_tokens"], kl_coef=0.1, kl_target=6.0)
    trainer = PPOTrainer(policy, reference, value_model, lambda p, r: sum(t % 2 == 0 for t in r) / len(r), opt, cfg,
                         eos_id=None, pad_id=PAD)
    generation = Timer(rollout.generate_tokens, device)
    rollout.generate_tokens = generation
    trainer.collect = collect = Timer(trainer.collect, device)
    trainer.update = update = Timer(trainer.update, device)
    g, vocab = torch.Generator().manual_seed(0), size["model"]["vocab_size"]
    memory.start()
    times, cpu = [], []
    for i in range(size["warmup"] + size["steps"]):
        prompts = [random_tokens(size["prompt_len"], vocab, g) for _ in range(size["rollout_batch"])]
        if i == size["warmup"]:
            generation.total = collect.total = update.total = 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.step(prompts)
        sync(device)
        if i >= size["warmup"]:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    total = sum(times)
    step_s = statistics.median(times)
    tokens = size["rollout_batch"] * (size["prompt_len"] + size["new_tokens"])
    generated = size["rollout_batch"] * size["new_tokens"] * len(times)
    return {"tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "cpu_per_wall": sum(cpu) / total, **memory.report(),
            "generation_share": generation.total / total,
            "scoring_share": (collect.total - generation.total) / total,
            "update_share": update.total / total,
            "generated_tokens_per_s": generated / generation.total}


def run_case(case: str, size: dict, device: torch.device) -> dict:
    if case == "ppo":
        return run_ppo(size, device)
    return run_dpo(size, device, reference_model=case == "dpo_reference_model")


def table(rows: list[dict]) -> str:
    lines = ["| step | tokens/step | s/step | tokens/s | peak memory (GB) | above start (GB) | generation share |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        share = f"{r['generation_share']:.0%}" if "generation_share" in r else "-"
        lines.append(f"| {CASES[r['case']]} | {r['tokens_per_step']:,} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_gb']:.3f} | {r['above_base_gb']:.3f} | {share} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny model and one measured step per case (seconds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in this process
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available")
    size = SIZES["smoke" if args.smoke else "full"]
    if args.case:
        torch.set_num_threads(args.threads)
        print(json.dumps({"case": args.case, **run_case(args.case, size, device)}))
        return
    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--threads", str(args.threads), "--device", args.device]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"alignment_{device.type}{'_smoke' if args.smoke else ''}.json"
    meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
            "size": {k: v for k, v in size.items() if k not in ("warmup", "steps")},
            "warmup_steps": size["warmup"], "measured_steps": size["steps"]}
    (out / name).write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
