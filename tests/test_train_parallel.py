"""`tessera train` under torchrun (gloo): the same recipe on FSDP2, DDP and DeepSpeed ZeRO, sharded
checkpoints that resume exactly or on another layout, and preemption by signal.

Layouts with the same data-parallel size read the same batches, so their losses must agree;
that each of them agrees with one process on the same global batch is tests/test_distributed.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera.core.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8

RECIPE = """
[model]
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_model = 32
d_ff = 64
max_seq_len = 32
norm = "rmsnorm"
pos = "rope"
mlp = "swiglu"
[train]
steps = {steps}
batch_size = 4
seq_len = 32
[optim]
lr = 1e-2
warmup_steps = 2
grad_clip = 0.5
[eval]
every = 4
batches = 2
[checkpoint]
every = 4
keep_last = 5
[log]
every = 1
progress = false
tensorboard = false
"""


def tessera(*args, nproc: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "tessera"] if nproc > 1 else [sys.executable, "-m", "tessera"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, corpus_text, char_tokenizer) -> Path:
    """Data in shards small enough for two ranks (train and val), and the recipe reading it."""
    from tessera.core.data import prepare

    root = tmp_path_factory.mktemp("train_parallel")
    (root / "corpus.txt").write_text(corpus_text)
    prepare([str(root / "corpus.txt")], char_tokenizer, root / "data", val_fraction=0.1,
            shard_tokens=2_500, sample_tokens=500)
    path = root / "recipe.toml"
    path.write_text(RECIPE.format(steps=STEPS) + f"[data]\npath = {json.dumps(str(root / 'data'))}\n")
    return path


def run_dir_arg(path: Path) -> str:
    return f"--train.run_dir={json.dumps(str(path))}"


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


LAYOUTS = {
    "fsdp": ["--parallel.dp_shard=2"],
    "fsdp_async": ["--parallel.dp_shard=2", "--checkpoint.async_save=true"],
    "fsdp_offload": ["--parallel.dp_shard=2", '--parallel.offload_optimizer="cpu"'],
    "ddp": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
    "zero1": ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"],
    "zero3": ["--parallel.engine=deepspeed", "--parallel.zero_stage=3"],
}


class Runs(dict):
    """The run directory of each layout, trained on 2 ranks when a test first asks for it (so the
    slow-marked layouts cost nothing in the default run)."""

    def __init__(self, recipe: Path):
        super().__init__()
        self.recipe = recipe

    def __missing__(self, name: str) -> Path:
        self[name] = self.recipe.parent / name
        tessera("train", self.recipe, run_dir_arg(self[name]), *LAYOUTS[name], nproc=2)
        return self[name]


@pytest.fixture(scope="module")
def runs(recipe) -> Runs:
    return Runs(recipe)


@pytest.mark.parametrize("layout", ["ddp", "fsdp_async", pytest.param("zero1", marks=pytest.mark.slow), "zero3"])
def test_same_data_parallel_size_gives_the_same_run(runs, layout):
    ref, got = losses(runs["fsdp"]), losses(runs[layout])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - ref[s]) / ref[s] for s in ref) < 1e-5, (got, ref)
    ref_norm, got_norm = losses(runs["fsdp"], "grad_norm"), losses(runs[layout], "grad_norm")
    assert abs(got_norm[1] - ref_norm[1]) / ref_norm[1] < 1e-5
    assert abs(losses(runs[layout], "val_loss")[STEPS] - losses(runs["fsdp"], "val_loss")[STEPS]) < 1e-4


def test_optimizer_offload_keeps_the_losses(runs):
    """FSDP2's CPUOffloadPolicy keeps the shards, their gradients and the AdamW step on the host. On a
    CPU that is the device: the same float32 operations, so the losses may differ only by the rounding
    of the updates, a few float32 epsilons relative per step at lr = 1e-2 (a generous bound)."""
    ref, got = losses(runs["fsdp"]), losses(runs["fsdp_offload"])
    tol = 16 * 1e-2 * STEPS * 2.0**-23
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - ref[s]) / ref[s] for s in ref) <= tol, (got, ref)


def test_the_run_learns(runs):
    got = losses(runs["fsdp"])
    assert got[STEPS] < got[1] - 0.3


def test_sharded_checkpoints_stand_alone(runs, tmp_path):
    fsdp = runs["fsdp"] / "checkpoints" / f"step_{STEPS:06d}"
    zero = runs["zero3"] / "checkpoints" / f"step_{STEPS:06d}"
    assert {".metadata", "rank0.pt", "rank1.pt", "config.json", "tokenizer.json"} <= {p.name for p in fsdp.iterdir()}
    assert {"deepspeed", "model.safetensors", "rank0.pt", "config.json"} <= {p.name for p in zero.iterdir()}
    assert not list(runs["fsdp"].glob("checkpoints/.*"))  # no temporary directories left behind
    for ckpt in (fsdp, zero):  # generation reads either format directly
        out = tessera("generate", "--ckpt", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "0")
        assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:")


def test_zero3_partitions_export_to_the_saved_weights(runs, tmp_path):
    import torch

    from tessera.core.checkpoint import load_model_from_checkpoint, read_model_config
    from tessera.distributed.deepspeed_engine import export_deepspeed

    ckpt = runs["zero3"] / "checkpoints" / f"step_{STEPS:06d}"
    exported = load_model_from_checkpoint(export_deepspeed(ckpt, read_model_config(ckpt), tmp_path)).state_dict()
    saved = load_model_from_checkpoint(ckpt).state_dict()
    assert exported.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_async", "zero3"])
def test_resume_on_the_same_layout_replays_the_run(runs, recipe, tmp_path, layout):
    middle = runs[layout] / "checkpoints" / "step_000004"
    tessera("train", recipe, run_dir_arg(tmp_path), *LAYOUTS[layout], f"--checkpoint.resume={json.dumps(str(middle))}",
            nproc=2)
    ref, got = losses(runs[layout]), losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(abs(got[s] - ref[s]) <= 1e-6 * ref[s] for s in got), (got, ref)


@pytest.mark.parametrize("nproc, overrides", [(1, []), (2, ["--parallel.dp_shard=1", "--parallel.tp=2"])])
def test_resume_on_another_layout_reshards(runs, recipe, tmp_path, nproc, overrides):
    middle = runs["fsdp"] / "checkpoints" / "step_000004"
    out = tessera("train", recipe, run_dir_arg(tmp_path), *overrides, f"--checkpoint.resume={json.dumps(str(middle))}",
                  nproc=nproc)
    assert "saved under another data-parallel layout" in out.stderr
    got, ref = losses(tmp_path), losses(runs["fsdp"])
    assert sorted(got) == [5, 6, 7, 8]
    # the trained weights came along: far below the untrained loss, near the uninterrupted run's
    assert abs(got[5] - ref[5]) < 0.1 and got[5] < ref[1] - 0.2


def test_a_single_process_checkpoint_is_not_resumed_sharded(runs, recipe, tmp_path):
    single = tmp_path / "single"
    tessera("train", recipe, run_dir_arg(single), "--train.steps=4")
    out = tessera("train", recipe, run_dir_arg(tmp_path / "sharded"), "--parallel.dp_shard=2", "--resume",
                  single / "checkpoints" / "step_000004", nproc=2, check=False)
    assert out.returncode != 0 and "is a single-process checkpoint" in out.stderr


def wait_for_metrics(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError("no metrics")


def test_sigterm_checkpoints_and_exits_for_requeue(recipe, tmp_path):
    """SIGTERM (and SLURM's SIGUSR1) mid-run: checkpoint after the current step, exit 3; the
    resumed run ends exactly where an uninterrupted one does."""
    long_run = ["train", recipe, run_dir_arg(tmp_path / "run"), "--train.steps=400", "--eval.every=0",
                "--checkpoint.every=0", "--optim.schedule=constant"]  # the same lr whatever train.steps says
    proc = subprocess.Popen([sys.executable, "-m", "tessera", *map(str, long_run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_metrics(tmp_path / "run", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "training interrupted" in err
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(ckpts) == 1
    stopped = int(ckpts[0].name.split("_")[1])
    assert 2 <= stopped < 400
    resumed = tessera("train", *long_run[1:], f"--train.steps={stopped + 3}", "--resume", "auto")
    assert f"trained steps {stopped}..{stopped + 3}" in resumed.stdout
    tessera("train", recipe, run_dir_arg(tmp_path / "straight"), f"--train.steps={stopped + 3}", "--eval.every=0",
            "--checkpoint.every=0", "--optim.schedule=constant")
    assert losses(tmp_path / "run")[stopped + 3] == losses(tmp_path / "straight")[stopped + 3]


def test_signal_on_one_rank_stops_all_ranks_at_the_same_step(recipe, tmp_path):
    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tessera",
           "train", str(recipe), run_dir_arg(tmp_path), "--parallel.dp_shard=2", "--train.steps=400",
           "--eval.every=0", "--checkpoint.every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_metrics(tmp_path, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "tessera" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "training interrupted" in err
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    assert {"rank0.pt", "rank1.pt", ".metadata"} <= {p.name for p in ckpt.iterdir()}
