"""Run a launch command on this machine, its output both on the console and in a log file.

`python` and `torchrun` in the command are found on PATH with the directory of the running
interpreter first, so a launch from a virtual environment trains in that environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tessera.launchers import jobs
from tessera.launchers.config import LaunchConfig


def child_environment(extra: list[tuple[str, str]]) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def run(cfg: LaunchConfig, argv: list[str], extra_env: list[tuple[str, str]]) -> int:
    """Run `argv` to its end, registered as a job; returns its exit status."""
    job = cfg.job
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(argv, env=child_environment(extra_env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        entry = jobs.JobEntry(f"local-{proc.pid}", job.name, job.backend, str(out), [str(log)], pid=proc.pid)
        jobs.record(entry)
        try:
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                sink.write(line)
                sink.flush()
        finally:
            entry.returncode = proc.wait()
            jobs.record(entry)
    return entry.returncode
