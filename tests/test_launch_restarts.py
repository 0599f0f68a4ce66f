"""Restarts through `tessera launch` (issue 16 item 12): a 2-rank gloo run under torchrun
`--max-restarts` whose workers are SIGKILLed again and again, at random moments (while the group
forms, mid-step, mid-save), resumes each time from its newest complete checkpoint and ends with
exactly the losses of an uninterrupted run; no hang, no half-written step directory left."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera.launchers import jobs
from tests.conftest import ROOT

LAUNCH = ROOT / "configs" / "launch" / "tiny-local.toml"
EVERY = 10  # checkpoint interval, in steps
KINDS = ("save", "step", "startup")  # where the kills land, in turn


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (whichever of its threads started them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def launch(tmp_path: Path, data: Path, run: str, steps: int, restarts: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tessera", "launch", str(LAUNCH), f"--data.path={data}",
                             f"--train.run_dir={tmp_path / run}", f"--job.name={run}", f"--job.output_dir={tmp_path / 'jobs'}",
                             "--job.nproc_per_node=2", f"--job.max_restarts={restarts}", f"--train.steps={steps}",
                             f"--checkpoint.every={EVERY}", "--eval.every=0", "--log.every=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def logged_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, ValueError):  # absent, or a line being written
        return 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert proc.poll() is None, f"the launch ended ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: hung?"
        time.sleep(0.005)
    return found


def newest_step(ckpts: Path) -> int:
    return max((int(p.name[5:]) for p in ckpts.glob("step_*")), default=0)


def kill_repeatedly(proc: subprocess.Popen, run_dir: Path, kills: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """SIGKILL one worker of each round, `kills` times; returns where each kill landed and the newest
    complete checkpoint as each round after a kill started (the previous round's workers all gone)."""
    ckpts, dead, landed, newest = run_dir / "checkpoints", set(), [], []

    def fresh_pair():
        workers = [w for agent in children(proc.pid) for w in children(agent) if w not in dead]
        return workers if len(workers) == 2 else None

    for i in range(kills):
        workers = wait_for(fresh_pair, proc, "a new pair of workers")
        if i:
            newest.append(newest_step(ckpts))
        kind = KINDS[i % len(KINDS)]
        if kind == "save":
            wait_for(lambda: list(ckpts.glob(".step_*.tmp")), proc, "a checkpoint being written")
        elif kind == "step":
            start = logged_step(run_dir)
            target = start + rng.randint(1, 2 * EVERY)
            wait_for(lambda: logged_step(run_dir) >= target, proc, f"step {target}")
        else:
            time.sleep(rng.uniform(0, 3))
        victim = rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        dead.update(workers)
        landed.append(f"{kind}@{logged_step(run_dir)}")
    wait_for(fresh_pair, proc, "a new pair of workers")
    newest.append(newest_step(ckpts))
    return landed, newest


def check_restarts(tmp_path: Path, data: Path, kills: int, steps: int, seed: int) -> dict:
    start = time.monotonic()
    plain = launch(tmp_path, data, "plain", steps, 0)
    out = plain.communicate(timeout=600)[0]
    assert plain.returncode == 0, out
    entry = jobs.find("plain", tmp_path / "jobs")
    assert entry.backend == "local" and jobs.status(entry) == "COMPLETED"
    assert f"trained steps 0..{steps}" in jobs.logs(entry)
    killed = launch(tmp_path, data, "killed", steps, kills)
    try:
        landed, newest = kill_repeatedly(killed, tmp_path / "killed", kills, random.Random(seed))
        output = killed.communicate(timeout=600)[0]
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == 0, output[-5000:]
    assert re.search(rf"trained steps \d+\.\.{steps} in", output), output[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", output)]
    # a round killed before it read its checkpoint prints nothing: the resumes are a subsequence of the rounds
    rounds = iter(newest)
    assert all(any(r == n for n in rounds) for r in resumed), (resumed, newest)
    assert newest[-1] == 0 or resumed[-1:] == newest[-1:], (resumed, newest)  # the round that finished
    expected, got = losses(tmp_path / "plain"), losses(tmp_path / "killed")
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    assert got == expected  # every step's loss, bit for bit: no batch lost or repeated
    ckpts = tmp_path / "killed" / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir() if not re.fullmatch(r"step_\d{6}", p.name)]
    assert not leftovers, leftovers  # killed saves were written again and renamed, pruning finished
    for step_dir in ckpts.iterdir():
        assert {".metadata", "rank0.pt", "rank1.pt", "config.json"} <= {p.name for p in step_dir.iterdir()}
    return {"kills": landed, "newest_at_restart": newest, "resumed_from": resumed, "seconds": round(time.monotonic() - start),
            "final_loss": got[steps]}


@pytest.fixture
def data(tmp_path, char_tokenizer, corpus_text) -> Path:
    from tessera.core.data import prepare

    (tmp_path / "corpus.txt").write_text(corpus_text)
    return prepare([str(tmp_path / "corpus.txt")], char_tokenizer, tmp_path / "data", shard_tokens=3000).root


def test_two_kills_one_mid_save_resume_to_the_same_losses(tmp_path, data):
    result = check_restarts(tmp_path, data, kills=2, steps=40, seed=0)
    assert result["kills"][0].startswith("save@") and result["newest_at_restart"][-1] > 0, result


@pytest.mark.slow
def test_ten_kills_at_random_moments_resume_to_the_same_losses(tmp_path, data):
    """Ten SIGKILLs (four mid-save, three mid-step, three while the group forms)."""
    result = check_restarts(tmp_path, data, kills=10, steps=200, seed=int(os.environ.get("TESSERA_KILL_SEED", "1")))
    print("restarts:", json.dumps(result))
    assert len(result["kills"]) == 10 and result["newest_at_restart"][-1] > 0, result
