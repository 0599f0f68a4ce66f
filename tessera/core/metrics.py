"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

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
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        self._file = open(self.path, "w")
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
