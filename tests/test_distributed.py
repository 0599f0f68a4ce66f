"""Parallel layouts against a single process: DDP, FSDP2, HSDP, TP, TP+SP, FSDP x TP, and AC.

Two torchrun launches (gloo on CPU) run every layout; each launch costs ~10 s of start-up, so
tests/distributed_worker.py trains all the layouts of one world size in sequence. Sharded
checkpoints take two more (tests/dcp_worker.py): saved on 2 ranks, resumed on 1, 2 (TP) and 4.
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

import dcp_worker
from tessera.core.checkpoint import load_model_from_checkpoint
from tessera.core.config import ConfigError, ModelConfig, ParallelConfig
from tessera.core.model import Transformer
from tessera.distributed.checkpoint import export_consolidated, load_sharded, save_sharded
from tessera.distributed.env import init_distributed
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import apply_ac

TESTS = Path(__file__).resolve().parent
LAUNCHES = {2: ["ddp", "fsdp", "tp", "tp_sp", "tp_sp_lp", "fsdp_ac", "fsdp_bf16", "zero1", "zero2", "zero3"],
            4: ["hsdp", "fsdp_tp"]}
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


@pytest.mark.parametrize("world,layout,style", [(w, name, style) for w, name in LAYOUTS for style in ("llama", "gpt2")]
                         + [(2, "tp_sp", "qwen2"), (4, "fsdp_tp", "qwen2")])
def test_layout_matches_single_process(runs, world, layout, style):
    run = runs[world]
    got, ref = run["layouts"][layout][style], run["reference"][style]
    assert max(map(rel, got["losses"], ref["losses"])) < 1e-5, (got["losses"], ref["losses"])
    assert rel(got["eval"], ref["eval"]) < 1e-5
    if got["frozen_eval"] is not None:  # an untrained second model on the same mesh: the first loss
        assert rel(got["frozen_eval"], ref["losses"][0]) < 1e-5
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


@pytest.mark.parametrize("layout", ["zero1", "zero2", "zero3"])
def test_zero_partitions_optimizer_state(runs, layout):
    for style, got in runs[2]["layouts"][layout].items():
        full_state = runs[2]["reference"][style]["state_numel"]
        for rank in got["per_rank"]:
            assert abs(rank["local_state_numel"] / full_state - 1 / 2) < 0.05, (style, rank)


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


# Sharded checkpoints (tessera/distributed/checkpoint.py): saved by FSDP over 2 ranks after 3 steps,
# resumed on 1 rank, on 4 ranks (FSDP) and under TP=2; each must continue like the 6-step run.

def torchrun_dcp(nproc: int, mode: str, root: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TESTS / "dcp_worker.py"), mode, str(root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((root / f"{mode}{nproc}.json").read_text())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    root = tmp_path_factory.mktemp("sharded")
    return root, torchrun_dcp(2, "save", root), torchrun_dcp(4, "load", root)


def close(got: list[float], ref: list[float]) -> bool:
    return max(map(rel, got, ref)) < 1e-5


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_sharded_checkpoint_resumes_on_other_layouts(sharded, style):
    root, saved, loaded = sharded
    ref = saved[0][style]["reference"]
    assert close(saved[0][style]["before"], ref[:3])
    assert close(saved[0][style]["tp"], ref[3:]), "TP=2 on 2 ranks"
    assert all(r[style]["tp_extra_ok"] for r in saved)  # same world size: per-rank extras come back
    assert close(loaded[0][style]["fsdp"], ref[3:]), "FSDP over 4 ranks"
    assert all(r[style]["extra_is_none"] for r in loaded)  # other world size: the caller decides
    losses, extra = dcp_worker.resume_single_process(root / style / "step_000003", style)
    assert close(losses, ref[3:]) and extra is None, "1 rank, plain model"


def test_sharded_checkpoint_restores_the_adam_moments(sharded):
    """Without the optimizer state the continued losses differ: the match above is not by chance."""
    root, saved, _ = sharded
    env = init_distributed("cpu")
    engine, x, y = dcp_worker.build("llama", None, env)
    load_sharded(root / "llama" / "step_000003", engine.model, engine.optimizer)
    engine.optimizer.state.clear()
    assert not close(dcp_worker.train(engine, x, y, 3), saved[0]["llama"]["reference"][3:])


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_consolidated_export_gives_the_trained_logits(sharded, tmp_path, style):
    root, _, _ = sharded
    out = export_consolidated(root / style / "step_000003", dcp_worker.MODELS[style], tmp_path / "export")
    model = load_model_from_checkpoint(out)
    with torch.no_grad():
        got = model(dcp_worker.global_batch()[0])
    torch.testing.assert_close(got, torch.load(root / f"{style}_logits.pt"), rtol=1e-6, atol=1e-6)


def test_interrupted_sharded_save_leaves_the_previous_step(tmp_path, monkeypatch):
    env = init_distributed("cpu")
    engine, _, _ = dcp_worker.build("llama", None, env)
    first = save_sharded(tmp_path, 3, engine.model, engine.optimizer, {"step": 3})
    reference = {n: p.clone() for n, p in engine.model.state_dict().items()}

    def crash(*args):
        raise KeyboardInterrupt("killed before the rename")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        for step in (4, 3):  # a new step, and an overwrite of the existing one
            with pytest.raises(KeyboardInterrupt):
                save_sharded(tmp_path, step, engine.model, engine.optimizer, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["step_000003"]
    fresh = dcp_worker.build("llama", None, env)[0]
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.zero_()
    assert load_sharded(first, fresh.model, fresh.optimizer) == {"step": 3}
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert save_sharded(tmp_path, 4, engine.model, engine.optimizer, {}).name == "step_000004"  # stray tmp is reused
