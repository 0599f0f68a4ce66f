"""Dynamic int8 against fp32 on CPU: checkpoint size, decoding tokens/s, and perplexity.

    python benchmarks/quantize.py [--ckpt CKPT] [--train-steps 400] [--out benchmarks/results]

Quality: the Shakespeare character recipe (trained for --train-steps with `tessera train` into
runs/quantize_bench_N, reused on later runs, unless --ckpt is given), perplexity over the whole validation split before and after
`tessera quantize --int8`. Speed and size also on a wider randomly initialised model (8 layers
x 512), where the linear layers dominate; decoding speed does not depend on the weights.
Greedy decoding of 48 new tokens with the KV cache, --threads (2) threads. Bounded: a few minutes on 2 busy cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tessera import kernels  # noqa: E402
from tessera.core.checkpoint import find_checkpoint, load_model_from_checkpoint  # noqa: E402
from tessera.core.config import ModelConfig, to_dict  # noqa: E402
from tessera.core.data import read_manifest  # noqa: E402
from tessera.core.evaluate import perplexity  # noqa: E402
from tessera.core.generate import Sampling, generate_tokens  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402
from tessera.interop.quantize import load_quantized, quantize_int8  # noqa: E402

DATA = ROOT / "data" / "prepared" / "shakespeare_char"
NEW_TOKENS = 48


class LogitsLoss(torch.nn.Module):
    """model(x, y) -> mean cross-entropy from full logits: the int8 LM head has no plain weight to fuse."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, x, y):
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())


def tessera(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tessera", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def trained_checkpoint(steps: int) -> Path:
    """The recipe trained for `steps` into runs/quantize_bench (reused when already there)."""
    run = ROOT / "runs" / f"quantize_bench_{steps}"
    if (run / "checkpoints" / f"step_{steps:06d}" / "model.safetensors").exists():
        return run / "checkpoints" / f"step_{steps:06d}"
    if not (DATA / "manifest.json").exists():
        tessera("tokenizer", "train", "--kind", "char", "data/tinyshakespeare.txt", "--out", str(DATA))
        tessera("data", "prepare", "--input", "data/tinyshakespeare.txt", "--tokenizer", str(DATA), "--out", str(DATA),
                "--shard-tokens", "100000")
    tessera("train", "configs/recipes/shakespeare/train.toml", f"--data.path={DATA}", f"--train.run_dir={run}",
            f"--train.steps={steps}", "--eval.every=0", "--checkpoint.every=0", "--log.tensorboard=false",
            "--log.progress=false")
    return find_checkpoint(run)


def random_checkpoint(work: Path) -> Path:
    from safetensors.torch import save_model

    cfg = ModelConfig(vocab_size=1024, n_layers=8, n_heads=8, n_kv_heads=4, d_model=512, d_ff=1376, max_seq_len=256,
                      norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False)
    torch.manual_seed(0)
    ckpt = work / "wide"
    ckpt.mkdir()
    save_model(Transformer(cfg), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    return ckpt


def tokens_per_s(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    generate_tokens(model, prompts, 4, sampling=Sampling(temperature=0))  # warm-up
    start = time.perf_counter()
    generate_tokens(model, prompts, new_tokens, sampling=Sampling(temperature=0))
    return batch * new_tokens / (time.perf_counter() - start)


def measure(name: str, ckpt: Path, work: Path, with_ppl: bool) -> list[dict]:
    int8_dir = quantize_int8(ckpt, work / f"{name}-int8")
    models = {"fp32": load_model_from_checkpoint(ckpt), "int8": load_quantized(int8_dir)}
    files = {"fp32": ckpt / "model.safetensors", "int8": int8_dir / "model.safetensors"}
    cfg = models["fp32"].cfg
    prompt = min(16, cfg.max_seq_len // 4)
    rows = []
    for kind, model in models.items():
        row = {"model": name, "weights": kind, "params": sum(p.numel() for p in models["fp32"].parameters()),
               "size_mb": files[kind].stat().st_size / 1e6}
        for batch in (1, 8):
            row[f"tokens_per_s_b{batch}"] = tokens_per_s(model, batch, prompt, min(NEW_TOKENS, cfg.max_seq_len - prompt))
        if with_ppl:
            manifest = read_manifest(DATA)
            row.update(perplexity(LogitsLoss(model), manifest, "val", cfg.max_seq_len, 32, torch.device("cpu")))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a trained Shakespeare character checkpoint; default: train one here")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.configure("torch")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = find_checkpoint(args.ckpt) if args.ckpt else trained_checkpoint(args.train_steps)
        rows = measure("shakespeare_char", ckpt, work, with_ppl=True) + measure("wide_random", random_checkpoint(work), work, False)
    print("| model | weights | size MB | tokens/s b1 | tokens/s b8 | val perplexity |\n|---|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['perplexity']:.4f}" if "perplexity" in r else "-"
        print(f"| {r['model']} | {r['weights']} | {r['size_mb']:.2f} | {r['tokens_per_s_b1']:.0f} | "
              f"{r['tokens_per_s_b8']:.0f} | {ppl} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"quantize_cpu_{args.threads}t.json").write_text(json.dumps({"train_steps": args.train_steps, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
