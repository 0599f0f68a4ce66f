"""Launchers without a cluster: launch-config validation, exact dry-run commands, sbatch scripts,
the job registry, telemetry without a GPU. The real SLURM runs are in test_launch_slurm.py."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera.core.config import ConfigError
from tessera.launchers import jobs, slurm, submitit_backend
from tessera.launchers.config import load_launch_config
from tessera.launchers.launch import plan
from tests.conftest import ROOT

LAUNCH = ROOT / "configs" / "launch"
SNAPSHOTS = Path(__file__).parent / "snapshots" / "launch"
TINY_ARGS = ("--model.n_layers=1 --model.n_heads=2 --model.d_model=32 --model.d_ff=0 --model.max_seq_len=32 "
             "--train.run_dir=runs/tiny --train.steps=20 --train.batch_size=4 --train.seq_len=32 --eval.every=10 "
             "--eval.batches=2 --checkpoint.every=10 --log.every=5 --log.progress=false")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths in the presets are relative to the repository


def tiny(*overrides: str):
    return load_launch_config(LAUNCH / "tiny-local.toml", list(overrides))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "launch.toml"
    path.write_text(text)
    return path


# --- the launch config


@pytest.mark.parametrize("overrides, message", [
    (["--job.nodez=2"], "unknown key job.nodez in [job]; valid: backend, name, nodes"),
    (["--job.backend=k8s"], "job.backend='k8s' is not valid; valid: local, torchrun, slurm, submitit"),
    (["--job.nodes=0"], "job.nodes=0 must be positive"),
    (["--job.nodes=2"], "job.nodes=2 with job.backend='local'"),
    (["--job.time=soon", "--job.backend=slurm"], "job.time='soon' is not a SLURM time"),
    (["--job.signal=USR1"], "job.signal='USR1' is not valid"),
    (["--job.name=my job"], "job.name='my job' may contain only"),
    (['--job.setup=["module load cuda"]'], "job.setup runs in batch scripts only"),
    (["--job.backend=torchrun", "--job.nodes=2"], "job.hosts has 0 entries for job.nodes=2"),
    (["--job.nproc_per_node=2", "--parallel.tp=3"], "does not fit job.nodes x processes per node = 2"),
    (["--parallel.tpp=2"], "unknown key parallel.tpp in [parallel]; valid: engine, dp_replicate"),
    (["--modle.n_layers=2"], "recipe configs/shakespeare_char.toml with its overrides: unknown key modle"),
    (["--train.seq_len=64"], "train.seq_len=64 exceeds model.max_seq_len=32"),
    (["--recipe.path=nope.toml"], "recipe.path='nope.toml' does not exist"),
])
def test_invalid_launch_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    assert message in str(e.value)


def test_unknown_sections_and_bad_tables_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[train\].*valid: job, parallel, recipe"):
        load_launch_config(write(tmp_path, '[train]\nsteps = 1\n[recipe]\npath = "configs/shakespeare_char.toml"\n'))
    with pytest.raises(ConfigError, match="recipe.path is missing"):
        load_launch_config(write(tmp_path, "[job]\nname = 'x'\n"))
    recipe = '[recipe]\npath = "configs/shakespeare_char.toml"\n'
    with pytest.raises(ConfigError, match="job.env: '1X' is not a valid environment variable name"):
        load_launch_config(write(tmp_path, '[job]\nenv = { 1X = "a" }\n' + recipe))
    with pytest.raises(ConfigError, match="job.setup=.* must be a list of strings"):
        load_launch_config(write(tmp_path, '[job]\nsetup = "module load cuda"\n' + recipe))


def test_overrides_patch_the_launch_config_or_the_recipe():
    cfg = tiny("--job.nproc_per_node=2", "--optim.lr=3e-3", "--parallel.dp_shard=2", "--data.path=/d x",
               "--recipe.overrides.train.steps=7")
    assert cfg.job.world_size == 2
    assert cfg.parallel == ("--parallel.dp_shard=2",)
    assert cfg.recipe.overrides[-2:] == ("--optim.lr=0.003", '--data.path="/d x"')
    assert "--train.steps=7" in cfg.recipe.overrides and "--train.steps=20" not in cfg.recipe.overrides
    assert cfg.train_overrides()[-1] == "--parallel.dp_shard=2"


# --- exact dry-run commands


def test_dry_run_of_one_process_is_python_without_torchrun():
    assert plan(tiny()) == f"python -m tessera train configs/shakespeare_char.toml {TINY_ARGS}"


def test_dry_run_of_one_node_uses_torchrun_standalone_and_restart_env():
    cfg = tiny("--job.nproc_per_node=2", "--job.max_restarts=3")
    assert plan(cfg) == ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node 2 --max-restarts 3 "
                         f"-m tessera train configs/shakespeare_char.toml {TINY_ARGS} --checkpoint.resume=auto")


def test_dry_run_of_torchrun_nodes_gives_one_command_per_node():
    cfg = tiny("--job.backend=torchrun", "--job.nodes=2", "--job.nproc_per_node=4", '--job.hosts=["10.9.0.1", "10.9.0.2"]',
               "--job.port=29400", '--job.env={GLOO_SOCKET_IFNAME = "veth0"}')
    common = "--nnodes 2 --nproc_per_node 4 --rdzv-id tiny --rdzv-backend c10d --rdzv-endpoint 10.9.0.1:29400"
    train = f"-m tessera train configs/shakespeare_char.toml {TINY_ARGS}"
    assert plan(cfg) == (f"# node 0 (10.9.0.1)\nGLOO_SOCKET_IFNAME=veth0 torchrun {common} --local-addr 10.9.0.1 "
                         f"--rdzv-conf is_host=true {train}\n"
                         f"# node 1 (10.9.0.2)\nGLOO_SOCKET_IFNAME=veth0 torchrun {common} --local-addr 10.9.0.2 {train}")


def test_cli_dry_run_prints_and_errors_exit_2():
    run = [sys.executable, "-m", "tessera", "launch", str(LAUNCH / "tiny-local.toml"), "--dry-run"]
    ok = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout == f"python -m tessera train configs/shakespeare_char.toml {TINY_ARGS}\n"
    bad = subprocess.run([*run, "--job.nodes=-1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr == "tessera: error: job.nodes=-1 must be positive\n"


# --- sbatch scripts


def test_sbatch_script_runs_torchrun_per_node_and_requeues_on_the_signal():
    cfg = tiny("--job.backend=slurm", "--job.nodes=4", "--job.gpus_per_node=8", "--job.partition=gpu",
               "--job.account=lm", "--job.time=1-00:00:00", "--job.exclusive=true", '--job.setup=["module load cuda"]',
               "--parallel.dp_shard=32")
    script = slurm.render(cfg, workdir="/work")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lm", "#SBATCH --time=1-00:00:00", "#SBATCH --exclusive",
                 "#SBATCH --chdir=/work", "#SBATCH --output=runs/jobs/tiny-%j.out", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --requeue", "module load cuda",
                 "export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=90",
                 'trap \'stopping=1; echo tessera: SIGUSR1, checkpoint and stop; kill -USR1 "$step"\' USR1',
                 '  scontrol requeue "$SLURM_JOB_ID"']:
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun == ('srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun --nnodes "$SLURM_JOB_NUM_NODES" '
                    '--nproc_per_node 8 --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" '
                    f"-m tessera train configs/shakespeare_char.toml {TINY_ARGS} --parallel.dp_shard=32 "
                    "--checkpoint.resume=auto &")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_sbatch_script_with_one_task_per_process_exports_the_rendezvous():
    cfg = tiny("--job.backend=slurm", "--job.nproc_per_node=2", "--job.slurm_tasks=process", "--job.signal=",
               "--job.requeue=false")
    script = slurm.render(cfg, workdir="/work").splitlines()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --no-requeue" in script
    assert 'export MASTER_ADDR="$head_node"' in script and "export MASTER_PORT=29500" in script
    assert f"srun --kill-on-bad-exit=1 python -m tessera train configs/shakespeare_char.toml {TINY_ARGS} &" in script
    assert not any("trap" in line or "scontrol requeue" in line for line in script)
    with pytest.raises(ConfigError, match="job.max_restarts needs torchrun"):
        slurm.render(tiny("--job.backend=slurm", "--job.slurm_tasks=process", "--job.max_restarts=1"))


@pytest.mark.parametrize("preset", sorted(p.stem for p in LAUNCH.glob("*.toml")))
def test_preset_dry_runs_match_their_snapshots(preset):
    """The exact scripts and commands of every preset; UPDATE_SNAPSHOTS=1 rewrites them."""
    text = plan(load_launch_config(LAUNCH / f"{preset}.toml")).replace(str(ROOT), "{ROOT}") + "\n"
    snapshot = SNAPSHOTS / f"{preset}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text()


def test_presets_use_every_gpu():
    sizes = {p.stem: load_launch_config(p).job.world_size for p in LAUNCH.glob("*.toml")}
    assert sizes == {"tiny-local": 1, "gpt2-124m-1gpu": 1, "llama-1b-1x8": 8, "llama-8b-8x8": 64, "llama-70b-32x8": 256}


# --- submitit, jobs, telemetry


def test_submitit_parameters():
    assert [submitit_backend.minutes(t) for t in ("30", "10:30", "2:00:00", "1-02", "1-00:00:01")] == [30, 11, 120, 1560, 1441]
    params = submitit_backend.parameters(tiny("--job.backend=submitit", "--job.nproc_per_node=2", "--job.time=10:00",
                                              "--job.partition=debug", '--job.env={A = "b c"}'))
    assert params == {"name": "tiny", "nodes": 1, "tasks_per_node": 2, "timeout_min": 10,
                      "slurm_setup": ["export A='b c'"], "slurm_partition": "debug", "slurm_signal_delay_s": 90}
    with pytest.raises(ConfigError, match="job.time is required"):
        submitit_backend.parameters(tiny("--job.backend=submitit"))


def test_job_registry_finds_by_id_or_newest_name(tmp_path):
    for pid, rc in ((11, 0), (12, 1)):
        jobs.record(jobs.JobEntry(f"local-{pid}", "tiny", "local", str(tmp_path), [], pid=pid, returncode=rc))
    assert jobs.find("local-11", tmp_path).returncode == 0
    assert jobs.find("tiny", tmp_path).id == "local-12"
    assert jobs.status(jobs.find("local-11", tmp_path)) == "COMPLETED"
    assert jobs.status(jobs.find("tiny", tmp_path)) == "FAILED (exit 1)"
    assert jobs.status(jobs.JobEntry("local-x", "t", "local", str(tmp_path), pid=os.getpid())) == "RUNNING"
    with pytest.raises(ConfigError, match=r"no job 'other' .*known: local-11 \(tiny\), local-12 \(tiny\)"):
        jobs.find("other", tmp_path)


def test_telemetry_switches_off_without_a_gpu(caplog):
    from tessera.launchers.telemetry import GpuTelemetry

    with caplog.at_level(logging.INFO, logger="tessera.launchers.telemetry"):
        telemetry = GpuTelemetry()
    if telemetry.enabled:
        pytest.skip("a GPU is visible to NVML")
    assert telemetry.sample() == {}
    assert [r.message for r in caplog.records] in (["GPU telemetry off: NVMLError_LibraryNotFound"],
                                                  ["GPU telemetry off: nvidia-ml-py is not installed (pip install 'tessera[launch]')"])


def test_launchers_import_no_training_code():
    """The design's rule: launchers build commands from tessera.core.config and import nothing else."""
    code = ("import sys, tessera.launchers.launch, tessera.launchers.jobs, tessera.launchers.submitit_backend, "
            "tessera.launchers.telemetry; print(sorted(m for m in sys.modules if m.startswith(('torch', 'tessera.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not [m for m in eval(out) if not m.startswith(("tessera.launchers", "tessera.core.config")) and m != "tessera.core"]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (whichever of its threads started them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_torchrun_restart_after_a_killed_worker_resumes_to_the_same_loss(tmp_path, char_tokenizer, corpus_text):
    """Elastic, through the local backend: SIGKILL one of 2 workers after a checkpoint; torchrun
    restarts the group, which resumes from that checkpoint and ends at the loss of an
    uninterrupted run (whose registry entry and log are checked on the way)."""
    from tessera.core.data import prepare

    (tmp_path / "corpus.txt").write_text(corpus_text)
    data = prepare([str(tmp_path / "corpus.txt")], char_tokenizer, tmp_path / "data", shard_tokens=3000).root

    def start(run: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tessera", "launch", str(LAUNCH / "tiny-local.toml"),
                                 f"--data.path={data}", f"--train.run_dir={tmp_path / run}", f"--job.name={run}",
                                 f"--job.output_dir={tmp_path / 'jobs'}", "--job.nproc_per_node=2", "--job.max_restarts=1",
                                 "--train.steps=200", "--checkpoint.every=50", "--eval.every=0"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def final_loss(run: str) -> float:
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if r.get("step") == 200 and "loss" in r][-1]

    plain = start("plain")
    assert plain.wait(timeout=300) == 0, plain.stdout.read()
    entry = jobs.find("plain", tmp_path / "jobs")
    assert entry.backend == "local" and jobs.status(entry) == "COMPLETED"
    assert "trained steps 0..200" in jobs.logs(entry)
    killed = start("killed")
    deadline = time.time() + 200
    while not (tmp_path / "killed" / "checkpoints" / "step_000050").exists():
        assert time.time() < deadline and killed.poll() is None, killed.stdout.read() if killed.poll() is not None else ""
        time.sleep(0.05)
    workers = [w for agent in _children(killed.pid) for w in _children(agent)]
    assert len(workers) == 2 and killed.poll() is None, (workers, killed.poll())
    os.kill(workers[1], signal.SIGKILL)
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == 0, output
    assert re.search(r"trained steps (50|100|150)\.\.200", output), output
    assert final_loss("killed") == final_loss("plain")
