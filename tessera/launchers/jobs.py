"""`tessera jobs list | status|logs|cancel JOB`: the jobs Tessera launched, from a registry file.

Every launch appends an entry to `<job.output_dir>/jobs.json` (id, name, backend, log files);
JOB is a job id or a job name (its newest launch). SLURM and submitit jobs are asked of SLURM,
falling back to the exit status the batch script leaves behind once SLURM forgets a job
(no accounting: `sacct` fails and `scontrol` drops jobs after MinJobAge); local runs are a
process id and the exit status the launcher recorded.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tessera.core.config import ConfigError
from tessera.launchers import slurm

REGISTRY = "jobs.json"


@dataclass
class JobEntry:
    id: str
    name: str
    backend: str
    output_dir: str
    logs: list[str] = field(default_factory=list)
    submitted: str = ""
    pid: int = 0  # local runs
    returncode: int | None = None  # local runs, once finished


def _path(output_dir: str | Path) -> Path:
    return Path(output_dir) / REGISTRY


def entries(output_dir: str | Path) -> list[JobEntry]:
    path = _path(output_dir)
    if not path.exists():
        return []
    return [JobEntry(**e) for e in json.loads(path.read_text())]


def record(entry: JobEntry) -> None:
    """Add or replace `entry` in its output directory's registry (written aside, then renamed)."""
    entry.submitted = entry.submitted or time.strftime("%Y-%m-%dT%H:%M:%S")
    path = _path(entry.output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [e for e in entries(entry.output_dir) if e.id != entry.id]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([asdict(e) for e in [*kept, entry]], indent=1))
    tmp.replace(path)


def find(job: str, output_dir: str | Path) -> JobEntry:
    known = entries(output_dir)
    matches = [e for e in known if e.id == job] or [e for e in known if e.name == job]
    if not matches:
        names = ", ".join(sorted({f"{e.id} ({e.name})" for e in known})) or "none"
        raise ConfigError(f"no job {job!r} in {_path(output_dir)}; known: {names}")
    return matches[-1]


def status(entry: JobEntry) -> str:
    """RUNNING, PENDING, COMPLETED, FAILED, ... (SLURM's names), or UNKNOWN."""
    if entry.backend in ("local", "torchrun"):
        if entry.returncode is not None:
            return "COMPLETED" if entry.returncode == 0 else f"FAILED (exit {entry.returncode})"
        return "RUNNING" if _alive(entry.pid) else "UNKNOWN"
    found = slurm.state(entry.id)
    if found:
        return found
    exit_path = slurm.exit_file(entry.output_dir, entry.name, entry.id)
    if exit_path.exists():
        rc = int(exit_path.read_text().strip() or 1)
        return "COMPLETED" if rc == 0 else f"FAILED (exit {rc})"
    return "UNKNOWN"


def rank_logs(entry: JobEntry) -> list[Path]:
    """Each rank's own stdout/stderr files, as torchrun tees them (every attempt of a requeued job)."""
    root = Path(entry.output_dir) / f"{entry.name}-{entry.id}-ranks"
    return sorted(p for p in root.rglob("std*.log") if p.stat().st_size) if root.is_dir() else []


def logs(entry: JobEntry) -> str:
    """The job's console log, then every rank's complete log: torchrun's console copy can miss a
    rank's last lines when a signal ends torchrun (preemption), its own file never does."""
    parts = []
    for log in entry.logs:
        path = Path(log)
        parts.append(path.read_text(errors="replace") if path.exists() else f"(no log yet at {path})\n")
    for path in rank_logs(entry):
        parts.append(f"--- {path} ---\n{path.read_text(errors='replace')}")
    return "".join(parts)


def follow(entry: JobEntry, poll_s: float = 1.0):
    """The console log as it grows (`tessera jobs logs --follow`), until the job has ended."""
    logs_ = [Path(p) for p in entry.logs]
    sent = dict.fromkeys(logs_, 0)
    while True:
        ended = status(entry) not in ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING")
        for path in logs_:
            if path.exists():
                with open(path, errors="replace") as f:
                    f.seek(sent[path])
                    text = f.read()
                sent[path] += len(text.encode())
                if text:
                    yield text
        if ended:
            return
        time.sleep(poll_s)


def cancel(entry: JobEntry) -> None:
    if entry.backend in ("local", "torchrun"):
        if entry.returncode is None and _alive(entry.pid):
            os.kill(entry.pid, signal.SIGTERM)
        return
    slurm.cancel(entry.id)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
