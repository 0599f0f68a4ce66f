"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard.

The history is only ever appended to; a resumed run that must drop records past its checkpoint
writes the kept ones aside and renames them over the file, so a kill -9 or a full disk at any
moment leaves the old history or the new one, never an empty file.
"""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from tessera.core.storage import StorageError, no_space, write_text_atomic

# Dense bf16 peak FLOP/s of accelerators we know, for MFU when log.peak_tflops is not set.
KNOWN_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in KNOWN_PEAK_FLOPS.items() if k in name), None)
    return None


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident memory since the process started or since `reset_peak_rss()`.

    Read from VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent
    across fork and exec, so a child of a large process would report the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Start a new peak-memory measurement from the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        """A fresh run starts a new metrics.jsonl; a resumed one keeps the records up to `resume_step`."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a fresh run starts a new history; a resumed one keeps what its checkpoint saw
            records = read_metrics(run_dir) if resume_step is not None else []
            kept = [r for r in records if r["step"] <= resume_step]
            if resume_step is None or len(kept) < len(records) or _torn(self.path):
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            if no_space(e):
                raise StorageError(f"cannot append to {self.path}: no space left on device") from None
            raise
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullMetrics:
    """The logger of ranks other than the first: one writer per run."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _torn(path: Path) -> bool:
    """Whether the file's last line was cut short (a kill mid-write): it does not end in a newline."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a kill mid-write is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines]
