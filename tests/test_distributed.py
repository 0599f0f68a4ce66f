"""Parallel layouts against a single process: DDP, FSDP2, HSDP, TP, TP+SP, FSDP x TP, and AC.

Two torchrun launches (gloo on CPU) run every layout; each launch costs ~10 s of start-up, so
tests/distributed_worker.py trains all the layouts of one world size in sequence.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera.core.config import ConfigError, ModelConfig, ParallelConfig
from tessera.core.model import Transformer
from tessera.distributed.env import init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import apply_ac

TESTS = Path(__file__).resolve().parent
LAUNCHES = {2: ["ddp", "fsdp", "tp", "tp_sp", "fsdp_ac", "fsdp_bf16"], 4: ["hsdp", "fsdp_tp"]}
LAYOUTS = [(n, name) for n, names in LAUNCHES.items() for name in names if name != "fsdp_bf16"]


def torchrun(nproc: int, out: Path, *layouts: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TESTS / "distributed_worker.py"), str(out), *layouts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    return {n: torchrun(n, root / f"world{n}.json", *names) for n, names in LAUNCHES.items()}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("world,layout", LAYOUTS)
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_layout_matches_single_process(runs, world, layout, style):
    run = runs[world]
    got, ref = run["layouts"][layout][style], run["reference"][style]
    assert max(map(rel, got["losses"], ref["losses"])) < 1e-5, (got["losses"], ref["losses"])
    assert rel(got["eval"], ref["eval"]) < 1e-5
    assert rel(got["norms"][0], ref["norms"][0]) < 1e-5  # clipping sees the global norm
    assert max(map(rel, got["norms"], ref["norms"])) < 1e-3
    for name, (total, abs_total) in ref["checksums"].items():
        got_total, got_abs = got["checksums"][name]
        assert abs(got_abs - abs_total) <= 1e-4 * abs_total + 1e-4, name
        assert abs(got_total - total) <= 1e-4 * abs_total + 1e-4, name


def test_fsdp_bf16_mixed_precision_trains_close_to_fp32(runs):
    for style, got in runs[2]["layouts"]["fsdp_bf16"].items():
        ref = runs[2]["reference"][style]
        assert max(map(rel, got["losses"], ref["losses"])) < 2e-2, style


@pytest.mark.parametrize("world,layout,shards", [(2, "fsdp", 2), (4, "hsdp", 2)])
def test_fsdp_holds_a_shard_of_params_and_optimizer_state(runs, world, layout, shards):
    for style, got in runs[world]["layouts"][layout].items():
        for rank in got["per_rank"]:
            assert abs(rank["local_param_numel"] / got["param_numel"] - 1 / shards) < 0.01, style
            assert abs(rank["local_state_numel"] / got["state_numel"] - 1 / shards) < 0.01, style


def test_layout_that_does_not_fit_the_world_is_refused():
    with pytest.raises(ConfigError, match=r"dp_replicate=1 x parallel.dp_shard=3 x parallel.tp=2 .* world "
                                          r"size of 4; valid layouts .*1x2x2"):
        ParallelDims.resolve(ParallelConfig(dp_shard=3, tp=2), 4)
    with pytest.raises(ConfigError, match="world size of 6"):
        ParallelDims.resolve(ParallelConfig(dp_replicate=4), 6)
    dims = ParallelDims.resolve(ParallelConfig(dp_replicate=2, tp=2), 8)
    assert (dims.dp_shard, dims.dp_size, dims.dp_rank(5)) == (2, 4, 2)


def test_single_process_and_slurm_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.backend) == (0, 1, None)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed("cpu")


def grads(model: Transformer, idx: torch.Tensor, compiled: bool = False) -> dict:
    (torch.compile(model) if compiled else model)(idx, idx).backward()
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,compiled", [("full", False), ("selective", False), ("op", False),
                                           ("full", True), ("op", True)])
def test_activation_checkpointing_keeps_gradients(mode, compiled):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, norm="rmsnorm",
                      pos="rope", mlp="swiglu", d_ff=64, max_seq_len=16)
    model = Transformer(cfg)
    checkpointed = copy.deepcopy(model)
    apply_ac(checkpointed, mode, every=2)
    assert checkpointed.state_dict().keys() == model.state_dict().keys()  # checkpoints keep their keys
    idx = torch.randint(0, 61, (2, 16))
    expected = grads(model, idx)
    got = grads(checkpointed, idx, compiled)
    assert expected.keys() == got.keys()
    for name in expected:
        if compiled:  # compiled kernels fuse differently: equal up to rounding
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def step_memory_growth(mode: str) -> int:
    # A fixed mmap threshold makes glibc hand large freed blocks back, so peak RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(TESTS.parent)}
    out = subprocess.run([sys.executable, str(TESTS / "ac_memory.py"), mode], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out)["growth"]


def test_full_activation_checkpointing_cuts_peak_memory():
    none, full = step_memory_growth("none"), step_memory_growth("full")
    assert full < 0.6 * none, f"peak growth {full / 2**20:.0f} MiB with AC vs {none / 2**20:.0f} MiB without"
