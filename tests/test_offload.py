"""Optimizer offload (`parallel.offload_optimizer`): the layouts it can run on, the DeepSpeed config
it produces, and (slow: DeepSpeed builds its CPU Adam) ZeRO-Offload's loss parity. The loss parity
of an offloaded FSDP2 run is in tests/test_train_parallel.py (it shares that module's runs)."""
import json

import pytest

from tessera.core.config import ConfigError, load_config
from tessera.core.placement import LocalPlacement
from tessera.distributed.layout import check_layout
from tessera.distributed.mesh import ParallelDims
from tests.test_train_parallel import STEPS, losses, recipe, run_dir_arg, tessera  # noqa: F401 (recipe: a fixture)

OFFLOAD = '--parallel.offload_optimizer="cpu"'


def layout(world, *overrides):
    cfg = load_config(None, list(overrides))
    return cfg, ParallelDims.resolve(cfg.parallel, world)


@pytest.mark.parametrize("world, overrides", [
    (2, ["--parallel.dp_shard=2"]),
    (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),  # HSDP shards too
    (2, ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"]),
    (2, ["--parallel.engine=deepspeed", "--parallel.zero_stage=3"]),
])
def test_offload_runs_where_the_optimizer_is_sharded(world, overrides):
    check_layout(*layout(world, OFFLOAD, *overrides))


@pytest.mark.parametrize("world, overrides, named", [
    (1, [], "parallel.dp_shard > 1"),  # one process
    (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], "DDP"),
    (4, ["--parallel.dp_shard=2", "--parallel.tp=2"], "parallel.tp=1"),
    (2, ["--parallel.dp_shard=1", "--parallel.tp=2"], "tp=2"),
])
def test_offload_without_a_sharded_optimizer_is_refused_naming_the_keys(world, overrides, named):
    with pytest.raises(ConfigError, match="parallel.offload_optimizer='cpu'") as e:
        check_layout(*layout(world, OFFLOAD, *overrides))
    assert named in str(e.value)


def test_the_single_process_placement_refuses_offload():
    with pytest.raises(ConfigError, match="single-process placement"):
        LocalPlacement(__import__("torch").device("cpu")).check(load_config(None, [OFFLOAD]))


def test_sequence_parallel_windows_must_split_over_tp():
    schedule = "--train.seq_len_schedule=[[0, 17], [5, 32]]"
    with pytest.raises(ConfigError, match="window length 17 .* multiple of it"):
        check_layout(*layout(2, schedule, "--train.seq_len=32", "--parallel.dp_shard=1", "--parallel.tp=2"))
    check_layout(*layout(2, schedule, "--train.seq_len=32", "--parallel.dp_shard=1", "--parallel.tp=2",
                         "--parallel.sequence_parallel=false"))


def test_deepspeed_gets_zero_offload_in_its_config():
    pytest.importorskip("deepspeed")
    from tessera.distributed.deepspeed_engine import deepspeed_config

    for stage in (1, 2, 3):
        cfg = load_config(None, ["--parallel.engine=deepspeed", f"--parallel.zero_stage={stage}", OFFLOAD])
        zero = deepspeed_config(cfg, 2)["zero_optimization"]
        assert zero == {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": False}}, json.dumps(zero)
    plain = load_config(None, ["--parallel.engine=deepspeed"])
    assert deepspeed_config(plain, 2)["zero_optimization"] == {"stage": 2}


@pytest.mark.slow  # DeepSpeed compiles its CPU Adam op on first use (over 10 minutes on a busy 2-core machine)
def test_zero_offload_keeps_the_losses(recipe, tmp_path):
    """ZeRO-Offload steps with DeepSpeed's CPU Adam instead of torch's AdamW: the same update formula
    (decoupled weight decay, eps after the bias-corrected root) in another kernel, so the losses differ
    by update rounding only, as for FSDP2's offload."""
    pytest.importorskip("deepspeed")
    base = ["--parallel.engine=deepspeed", "--parallel.zero_stage=2"]
    tessera("train", recipe, run_dir_arg(tmp_path / "plain"), *base, nproc=2)
    tessera("train", recipe, run_dir_arg(tmp_path / "offload"), *base, OFFLOAD, nproc=2)
    ref, got = losses(tmp_path / "plain"), losses(tmp_path / "offload")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - ref[s]) / ref[s] for s in ref) <= 16 * 1e-2 * STEPS * 2.0**-23, (got, ref)


@pytest.mark.slow  # two two-rank launches
def test_offload_memory_benchmark_reports_the_residency_moved_off_the_device(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "offload_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["offload"]: r for r in json.loads((tmp_path / "offload_memory_cpu.json").read_text())["rows"]}
    plain, offloaded = rows["none"], rows["cpu"]
    assert not plain["offloaded"] and offloaded["offloaded"]
    resident = plain["param_mib"] + plain["grad_mib"] + plain["optim_mib"]
    assert plain["device_resident_mib"] == resident > 0 and offloaded["device_resident_mib"] == 0
    assert offloaded["host_resident_mib"] == pytest.approx(resident)
    assert plain["optim_mib"] == pytest.approx(2 * plain["param_mib"])  # AdamW: two moments per parameter
