"""Launchers without a cluster: launch-config validation, exact dry-run commands, sbatch scripts,
the job registry, telemetry without a GPU. The real SLURM runs are in test_launch_slurm.py."""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.core.config import ConfigError
from tessera.launchers import jobs, preflight, slurm, submitit_backend
from tessera.launchers.config import load_launch_config
from tessera.launchers.launch import launch, plan
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
    (["--modle.n_layers=2"], "recipe configs/recipes/shakespeare/train.toml with its overrides: unknown key modle"),
    (["--train.seq_len=64"], "train.seq_len=64 exceeds model.max_seq_len=32"),
    (["--recipe.path=nope.toml"], "recipe.path='nope.toml' does not exist"),
])
def test_invalid_launch_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    assert message in str(e.value)


def test_unknown_sections_and_bad_tables_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[train\].*valid: job, parallel, recipe"):
        load_launch_config(write(tmp_path, '[train]\nsteps = 1\n[recipe]\npath = "configs/recipes/shakespeare/train.toml"\n'))
    with pytest.raises(ConfigError, match="recipe.path is missing"):
        load_launch_config(write(tmp_path, "[job]\nname = 'x'\n"))
    recipe = '[recipe]\npath = "configs/recipes/shakespeare/train.toml"\n'
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
    assert plan(tiny()) == f"python -m tessera train configs/recipes/shakespeare/train.toml {TINY_ARGS}"


def test_dry_run_of_one_node_uses_torchrun_standalone_and_restart_env():
    cfg = tiny("--job.nproc_per_node=2", "--job.max_restarts=3")
    assert plan(cfg) == ("PYTHONWARNINGS=ignore::FutureWarning TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[${rank}]:' PYTHONUNBUFFERED=1 "
                         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node 2 "
                         "--tee 3 --log-dir runs/jobs/tiny-local-ranks --max-restarts 3 "
                         f"-m tessera train configs/recipes/shakespeare/train.toml {TINY_ARGS} --checkpoint.resume=auto")


def test_dry_run_of_torchrun_nodes_gives_one_command_per_node():
    cfg = tiny("--job.backend=torchrun", "--job.nodes=2", "--job.nproc_per_node=4", '--job.hosts=["10.9.0.1", "10.9.0.2"]',
               "--job.port=29400", "--job.socket_ifname=veth0", "--job.log_ranks=0")
    common = "--nnodes 2 --nproc_per_node 4 --rdzv-id tiny --rdzv-backend c10d --rdzv-endpoint 10.9.0.1:29400"
    logs = "--tee 3 --log-dir runs/jobs/tiny-tiny-ranks --local-ranks-filter 0"
    train = f"-m tessera train configs/recipes/shakespeare/train.toml {TINY_ARGS}"
    env = ("PYTHONWARNINGS=ignore::FutureWarning TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[${rank}]:' PYTHONUNBUFFERED=1 "
           "NCCL_SOCKET_IFNAME=veth0 GLOO_SOCKET_IFNAME=veth0")
    assert plan(cfg) == (f"# node 0 (10.9.0.1)\n{env} torchrun {common} --local-addr 10.9.0.1 "
                         f"--rdzv-conf is_host=true {logs} {train}\n"
                         f"# node 1 (10.9.0.2)\n{env} torchrun {common} --local-addr 10.9.0.2 "
                         f"--rdzv-conf is_host=false {logs} {train}")


def test_cli_dry_run_prints_and_errors_exit_2():
    run = [sys.executable, "-m", "tessera", "launch", str(LAUNCH / "tiny-local.toml"), "--dry-run"]
    ok = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout == f"python -m tessera train configs/recipes/shakespeare/train.toml {TINY_ARGS}\n"
    bad = subprocess.run([*run, "--job.nodes=-1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr == "tessera: error: job.nodes=-1 must be positive\n"


# --- sbatch scripts


def sbatch(*overrides: str, lead: int = 90) -> str:
    cfg = preflight.resolve(tiny("--job.backend=slurm", *overrides), preflight.Figures())
    return slurm.render(cfg, workdir="/work")


def test_sbatch_script_runs_torchrun_per_node_and_requeues_on_the_signal():
    script = sbatch("--job.nodes=4", "--job.gpus_per_node=8", "--job.partition=gpu", "--job.account=lm",
                    "--job.time=1-00:00:00", "--job.exclusive=true", '--job.setup=["module load cuda"]',
                    "--parallel.dp_shard=32", "--job.max_restarts=2", '--job.sbatch=["--reservation=r1", "--exclude=n7"]')
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lm", "#SBATCH --time=1-00:00:00", "#SBATCH --exclusive",
                 "#SBATCH --chdir=/work", "#SBATCH --output=runs/jobs/tiny-%j.out", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --requeue", "#SBATCH --reservation=r1", "#SBATCH --exclude=n7",
                 "set +u", "module load cuda", "set -u",
                 "export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=90", "export NCCL_DEBUG=WARN",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3", "export TORCH_NCCL_TRACE_BUFFER_SIZE=2000",
                 "export TORCH_NCCL_DUMP_ON_TIMEOUT=1", "export PYTHONWARNINGS=ignore::FutureWarning",
                 'head_addr="${head_addr:-$head_node}"', "port=$((29500 + SLURM_JOB_ID % 1000))",
                 'export TESSERA_RDZV_ENDPOINT="$head_addr:$port"',
                 'trap \'stopping=1; echo tessera: SIGUSR1, checkpoint and stop; kill -USR1 "$step"\' USR1',
                 '  scontrol requeue "$SLURM_JOB_ID"',
                 'if [ "$rc" != 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt 2 ]; then']:
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    inner = ('torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node 8 --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d '
             '--rdzv-endpoint "$TESSERA_RDZV_ENDPOINT" --rdzv-conf "is_host=$is_host" --tee 3 '
             '--log-dir "runs/jobs/tiny-$SLURM_JOB_ID-ranks" --max-restarts 2 '
             f"-m tessera train configs/recipes/shakespeare/train.toml {TINY_ARGS} --parallel.dp_shard=32 --checkpoint.resume=auto")
    per_task = f'is_host=false; [ "$SLURM_NODEID" = 0 ] && is_host=true; exec {inner}'
    assert srun == f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(per_task)} &"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_one_node_sbatch_uses_a_standalone_rendezvous_of_its_own():
    """Two one-node jobs on one node must not meet at one port (tested for real in test_launch_slurm)."""
    script = sbatch("--job.nproc_per_node=2")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun --standalone --nproc_per_node 2 ")
    assert "29500" not in script and "--rdzv-endpoint" not in script


def test_rendezvous_port_is_the_jobs_own_and_free():
    """The script's port lines, run with a job id whose port is taken: the next free port."""
    import socket

    lines = [line for line in sbatch("--job.nodes=2", "--job.slurm_tasks=process", "--job.signal=").splitlines()
             if line.startswith(("port=", "until "))]
    job_id = 12000 + random.randrange(1000)
    busy = 29500 + job_id % 1000
    try:
        taken = socket.create_server(("", busy))
    except OSError:
        pytest.skip(f"port {busy} is in use here already")
    with taken:
        text = "\n".join(["set -eu", f"SLURM_JOB_ID={job_id}", *lines, 'echo "$port"'])
        out = subprocess.run(["bash", "-c", text], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > busy


def test_sbatch_script_with_one_task_per_process_exports_the_rendezvous():
    script = sbatch("--job.nproc_per_node=2", "--job.slurm_tasks=process", "--job.signal=", "--job.requeue=false",
                    "--job.cpus_per_node=8", "--job.gpus_per_node=2", "--job.gpu_request=gres").splitlines()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --no-requeue" in script
    assert "#SBATCH --cpus-per-task=4" in script and "#SBATCH --gres=gpu:2" in script
    assert 'export MASTER_ADDR="$head_addr"' in script and 'export MASTER_PORT="$port"' in script
    assert f"srun --kill-on-bad-exit=1 python -m tessera train configs/recipes/shakespeare/train.toml {TINY_ARGS} &" in script
    assert not any("trap" in line or "scontrol requeue" in line for line in script)
    with pytest.raises(ConfigError, match="job.max_restarts needs torchrun"):
        sbatch("--job.slurm_tasks=process", "--job.max_restarts=1")


def test_a_failed_step_requeues_up_to_max_restarts():
    """The script's tail, run with a failing step: requeue while SLURM_RESTART_COUNT < max_restarts."""
    script = sbatch("--job.nproc_per_node=2", "--job.max_restarts=2", "--job.output_dir=/nonexistent")
    tail = script.splitlines()[script.splitlines().index("stopping=0") + 2:]
    for restarts, requeued in ((0, True), (1, True), (2, False)):
        text = "\n".join([f"SLURM_JOB_ID=7 SLURM_RESTART_COUNT={restarts}", "scontrol() { echo \"requeue $*\"; }",
                          "step=$$; stopping=0", "wait() { return 1; }", *[t for t in tail if not t.startswith("while")],
                          ]).replace('echo "$rc" > "/nonexistent/tiny-$SLURM_JOB_ID.exit"', "true")
        out = subprocess.run(["bash", "-c", "rc=1\n" + text], capture_output=True, text=True)
        assert ("requeue requeue 7" in out.stdout) == requeued, (restarts, out.stdout, out.stderr)
        assert out.returncode == (0 if requeued else 1)


@pytest.mark.parametrize("preset", sorted(p.stem for p in LAUNCH.glob("*.toml")))
def test_preset_dry_runs_match_their_snapshots(preset):
    """The exact scripts and commands of every preset; UPDATE_SNAPSHOTS=1 rewrites them."""
    printed = []
    assert launch(str(LAUNCH / f"{preset}.toml"), [], dry_run=True, echo=printed.append) == 0
    text = printed[0].replace(str(ROOT), "{ROOT}") + "\n"
    snapshot = SNAPSHOTS / f"{preset}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text()


def test_presets_use_every_gpu():
    sizes = {p.stem: load_launch_config(p).job.world_size for p in LAUNCH.glob("*.toml")}
    assert sizes == {"tiny-local": 1, "gpt2-124m-1gpu": 1, "code_gpt2_8gpu": 8, "code_gpt2_4node": 32, "llama-1b-1x8": 8, "llama-8b-8x8": 64, "llama-70b-32x8": 256}


# --- submitit, jobs, telemetry


def test_submitit_parameters():
    assert [submitit_backend.minutes(t) for t in ("30", "10:30", "2:00:00", "1-02", "1-00:00:01")] == [30, 11, 120, 1560, 1441]
    cfg = tiny("--job.backend=submitit", "--job.nproc_per_node=2", "--job.time=10:00", "--job.partition=debug",
               '--job.env={A = "b c"}', '--job.sbatch=["--mail-type=END", "--exclusive"]')
    params = submitit_backend.parameters(preflight.resolve(cfg, preflight.Figures()))
    assert params == {"name": "tiny", "nodes": 1, "tasks_per_node": 2, "timeout_min": 10,
                      "slurm_setup": ["export PYTHONWARNINGS=ignore::FutureWarning", "export A='b c'"],
                      "slurm_partition": "debug", "slurm_signal_delay_s": 90,
                      "slurm_additional_parameters": {"mail_type": "END", "exclusive": True}}
    with pytest.raises(ConfigError, match="job.time is required"):
        submitit_backend.parameters(tiny("--job.backend=submitit"))


def _sbatch_resources(cfg) -> dict:
    opts = dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in slurm.render(cfg).splitlines()
                if line.startswith("#SBATCH --"))
    tasks = int(opts["ntasks-per-node"])
    return {"nodes": int(opts["nodes"]), "cpus_per_node": tasks * int(opts.get("cpus-per-task", 0)),
            "gpus_per_node": int(opts.get("gpus-per-node", 0)), "mem": opts.get("mem", ""),
            "minutes": submitit_backend.minutes(opts["time"]), "signal_s": int(opts["signal"].split("@")[1])}


def _submitit_resources(cfg) -> dict:
    p = submitit_backend.parameters(cfg)
    return {"nodes": p["nodes"], "cpus_per_node": p["tasks_per_node"] * p.get("cpus_per_task", 0),
            "gpus_per_node": p.get("gpus_per_node", 0), "mem": p.get("slurm_mem", ""), "minutes": p["timeout_min"],
            "signal_s": p["slurm_signal_delay_s"]}


@pytest.mark.parametrize("preset", sorted(p.stem for p in LAUNCH.glob("*.toml")))
def test_sbatch_and_submitit_request_the_same_resources(preset):
    """One meaning of every job key: the same nodes, CPUs, GPUs, memory, time and signal either way."""
    figures = preflight.Figures(ckpt_bytes=10**12, step_s=5.0)
    time = [] if load_launch_config(LAUNCH / f"{preset}.toml").job.time else ["--job.time=1:00:00"]
    sb, si = (preflight.resolve(load_launch_config(LAUNCH / f"{preset}.toml", [f"--job.backend={b}", *time]), figures)
              for b in ("slurm", "submitit"))
    assert _sbatch_resources(sb) == _submitit_resources(si)
    assert _sbatch_resources(sb)["cpus_per_node"] == sb.job.cpus_per_node


@pytest.mark.parametrize("override, value", [
    ("--job.time=01:00:00", "01:00:00"), ("--job.time=60", "60"), ("--job.mem=0", "0"), ("--job.account=1234", "1234"),
    ('--job.account="lm x"', "lm x"),
])
def test_string_job_keys_take_the_text_as_written(override, value):
    key = override.split("=")[0].removeprefix("--job.")
    assert getattr(tiny("--job.backend=slurm", override).job, key) == value


def test_preemption_lead_follows_checkpoint_size_and_write_bandwidth():
    """Llama 70B's 0.85 TB at 5 GB/s takes 170 s: the signal comes early enough for it, not at 90 s."""
    cfg = load_launch_config(LAUNCH / "llama-70b-32x8.toml")
    figures = preflight.check(cfg, data=False)
    assert 0.84e12 < figures.ckpt_bytes < 0.86e12 and figures.step_s > 0
    lead = int(preflight.resolve(cfg, figures).job.signal.split("@")[1])
    assert lead >= figures.ckpt_bytes / 5e9 + figures.step_s + 60
    slower = dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, ckpt_write_gbps=2.5))
    assert int(preflight.resolve(slower, figures).job.signal.split("@")[1]) > lead + 150
    assert preflight.resolve(tiny("--job.backend=slurm", "--job.signal=USR1@45"), figures).job.signal == "USR1@45"
    assert preflight.resolve(tiny("--job.backend=slurm"), preflight.Figures(ckpt_bytes=10**6)).job.signal == "USR1@90"
    assert "KillWait >= " in preflight.advice(cfg, figures)


def test_launch_checks_data_and_fit_before_submitting(tmp_path):
    """Nothing reaches sbatch (not even a script) when the data is missing or the layout does not fit."""
    out = [f"--job.output_dir={tmp_path}", "--job.backend=slurm", "--job.time=10"]
    with pytest.raises(ConfigError, match=r"pre-launch check .*data.path='/nonexistent' does not exist"):
        launch(str(LAUNCH / "tiny-local.toml"), [*out, "--data.path=/nonexistent"])
    with pytest.raises(ConfigError, match=r"pre-launch check .*needs .* GiB per GPU by the planner, more than a h100's 80 GiB"):
        launch(str(LAUNCH / "llama-8b-8x8.toml"), [*out, "--job.nodes=1", "--parallel.dp_shard=8",
                                                   "--parallel.activation_checkpoint=none", "--train.batch_size=2"],
               dry_run=True)
    assert not list(tmp_path.iterdir())


def test_demo_script_passes_its_arguments_to_train_not_to_pip(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "demo.sh").write_text((ROOT / "scripts" / "demo.sh").read_text())
    (scripts / "env.sh").write_text('echo "env.sh got [$*]" >> "$LOG"\nexport PATH="$FAKE:$PATH"\n')
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tessera").write_text('#!/bin/sh\necho "tessera $*" >> "$LOG"\n')
    (tmp_path / "bin" / "tessera").chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "LOG": str(log), "FAKE": str(tmp_path / "bin")}
    subprocess.run(["bash", str(scripts / "demo.sh"), "--train.steps=300"], cwd=tmp_path, env=env, check=True)
    lines = log.read_text().splitlines()
    assert lines[0] == "env.sh got []"
    assert "tessera recipe shakespeare --train.steps=300" in lines


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


def test_jobs_list_and_logs_follow_until_the_job_ends(tmp_path, capsys):
    import threading

    from tessera.cli.main import main

    out_dir, log = tmp_path / "jobs", tmp_path / "jobs" / "follow.log"
    out_dir.mkdir()
    proc = subprocess.Popen(["bash", "-c", f"for i in 1 2 3 4; do echo line $i >> {log}; sleep 0.3; done"])
    threading.Thread(target=proc.wait, daemon=True).start()  # reaped as it ends, as a launcher does
    jobs.record(jobs.JobEntry(id=str(proc.pid), name="follow", backend="local", output_dir=str(out_dir),
                              logs=[str(log)], pid=proc.pid))
    assert main(["jobs", "list", "--dir", str(out_dir)]) == 0
    assert capsys.readouterr().out.split("\t")[:3] == [str(proc.pid), "follow", "local"]
    assert main(["jobs", "logs", "follow", "--follow", "--dir", str(out_dir)]) == 0
    assert capsys.readouterr().out == "".join(f"line {i}\n" for i in range(1, 5))
    assert main(["jobs", "status", "--dir", str(out_dir)]) == 2
