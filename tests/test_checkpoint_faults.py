"""Checkpoints and the run history under faults (issue 16 item 9): a full disk (a real small
tmpfs where this machine lets root mount one, and a simulated ENOSPC everywhere), a kill in the
middle of pruning, kill -9 at random moments of a save loop, and the files' permissions."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tessera.core import checkpoint as checkpoint_module
from tessera.core.checkpoint import Checkpointer, load_trainer_state
from tessera.core.config import ModelConfig
from tessera.core.metrics import MetricsLogger, read_metrics
from tessera.core.model import Transformer
from tessera.core.storage import StorageError

from save_loop import save_loop

FILES = {"model.safetensors", "trainer_state.pt", "config.json"}


def engine(d_model=8):
    m = Transformer(ModelConfig(vocab_size=13, n_layers=1, n_heads=2, d_model=d_model, max_seq_len=8))
    return SimpleNamespace(model=m, optimizer=torch.optim.AdamW(m.parameters()))


def assert_complete(step_dir: Path) -> None:
    """Every file a resume needs, and every tensor finite."""
    assert FILES <= {p.name for p in step_dir.iterdir()}, sorted(p.name for p in step_dir.iterdir())
    assert all(t.isfinite().all() for t in load_file(str(step_dir / "model.safetensors")).values())
    assert load_trainer_state(step_dir)["step"] == int(step_dir.name.split("_")[1])


def history(run: Path, steps: range) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs, or a skip where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint_and_history(tiny_disk):
    ck = Checkpointer(tiny_disk / "checkpoints", keep_last=3)
    e = engine(d_model=64)  # ~160 kB of weights, ~3x that with the optimizer state
    e.model(torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5))).backward()
    e.optimizer.step()
    first = ck.save(1, e, {"step": 1})
    history(tiny_disk, range(1, 6))
    before = (tiny_disk / "metrics.jsonl").read_bytes()
    free = shutil.disk_usage(tiny_disk).free
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # room for some files, not a checkpoint
    with pytest.raises(StorageError) as error:
        ck.save(2, e, {"step": 2})
    message = str(error.value)
    assert "no space left" in message and "step_000002" in message and "\n" not in message
    assert sorted(p.name for p in ck.directory.iterdir()) == ["step_000001"]  # the temporary directory is gone
    assert_complete(first)
    (tiny_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(tiny_disk).free + (tiny_disk / "filler").stat().st_size - 100))
    with pytest.raises(StorageError, match="no space left"):
        MetricsLogger(tiny_disk, tensorboard=False, resume_step=1)  # --resume auto must not wipe the history
    assert (tiny_disk / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("target", ["torch", "safetensors"])
def test_enospc_anywhere_in_a_save_is_one_line_and_leaves_no_temporary_directory(tmp_path, monkeypatch, target):
    ck = Checkpointer(tmp_path, keep_last=2)
    e = engine()
    good = ck.save(1, e, {"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "torch":
        monkeypatch.setattr(torch, "save", full)
    else:  # safetensors' Rust writer reports the OS error in its message only
        from safetensors import SafetensorError

        def rust_full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(checkpoint_module, "save_model", rust_full)
    with pytest.raises(StorageError, match=r"step_000002: no space left on device$"):
        ck.save(2, e, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    assert_complete(good)


def test_a_kill_while_pruning_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=2)
    e = engine()
    ck.save(1, e, {"step": 1})
    ck.save(2, e, {"step": 2})
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # pruning deletes one file, then the process "dies"
        if "step_000001" not in str(path):
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / "trainer_state.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(3, e, {"step": 3})
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ck.steps()] == ["step_000002", "step_000003"]
    for step in ck.steps():
        assert_complete(step)
    ck.save(4, e, {"step": 4})  # the next prune removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    """safetensors writes 0600; under the usual umask 022 teammates must be able to read checkpoints."""
    old = os.umask(umask)
    try:
        path = Checkpointer(tmp_path).save(1, engine(), {"step": 1})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [path, *path.iterdir()]}
    assert modes == {**{name: 0o666 & ~umask for name in modes}, path.name: 0o777 & ~umask}, modes


def test_history_survives_resume_and_a_torn_last_line(tmp_path):
    history(tmp_path, range(1, 6))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    logger.log(4, {"loss": 0.5})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=4)  # nothing to drop: appended to as it is
    logger.log(5, {"loss": 0.25})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_kill_9_at_random_moments_leaves_complete_checkpoints_and_history(tmp_path):
    """A save loop killed at random moments (writing, renaming, pruning) and resumed each time; the
    loops are forked from a server that imported torch once, so each kill costs no start-up."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "tessera.core.checkpoint", "tessera.core.metrics", "save_loop"])
    rng = random.Random(16)
    run = tmp_path / "run"
    last = 0
    for _ in range(6):
        ready = context.Event()
        proc = context.Process(target=save_loop, args=(str(run), ready))
        proc.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.02, 0.4))
        proc.kill()
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        steps = Checkpointer(run / "checkpoints").steps()
        assert steps and len(steps) <= 3  # a kill between publishing and pruning may leave one extra
        for step in steps:
            assert_complete(step)
        newest = int(steps[-1].name.split("_")[1])
        assert newest >= last
        records = [r["step"] for r in read_metrics(run)]
        assert records == list(range(1, len(records) + 1)) and len(records) >= newest
        last = newest
