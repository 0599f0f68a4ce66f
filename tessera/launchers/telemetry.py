"""Per-GPU telemetry from NVML (nvidia-ml-py): utilisation, memory, power, temperature, clocks.

`GpuTelemetry().sample()` returns flat metrics (`gpu0_util`, `gpu0_mem_gb`, ...) for the trainer
to log beside its own every N steps. Without a GPU or without the package, `nvmlInit` fails
(`NVMLError_LibraryNotFound`) and telemetry switches itself off with one info line, so the same
training code runs everywhere.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class GpuTelemetry:
    def __init__(self, devices: list[int] | None = None):
        """`devices`: NVML indices to sample (default: all the GPUs of this machine)."""
        self.handles: list[tuple[int, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            indices = range(pynvml.nvmlDeviceGetCount()) if devices is None else devices
            self.handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
            self.nvml = pynvml
        except ImportError:
            log.info("GPU telemetry off: nvidia-ml-py is not installed (pip install 'tessera[launch]')")
        except Exception as e:  # pynvml.NVMLError and its generated subclasses, e.g. LibraryNotFound
            log.info("GPU telemetry off: %s", e.__class__.__name__)

    @property
    def enabled(self) -> bool:
        return bool(self.handles)

    def sample(self) -> dict[str, float]:
        """The current readings; a reading the device does not support is left out."""
        nv = self.nvml if self.handles else None
        out: dict[str, float] = {}
        for index, handle in self.handles:
            readings = {
                "util": lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu,
                "mem_gb": lambda h: nv.nvmlDeviceGetMemoryInfo(h).used / 2**30,
                "power_w": lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000,
                "temp_c": lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                "sm_clock_mhz": lambda h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                "mem_clock_mhz": lambda h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            }
            for name, read in readings.items():
                try:
                    out[f"gpu{index}_{name}"] = float(read(handle))
                except nv.NVMLError:
                    continue
        return out

    def close(self) -> None:
        if self.handles:
            self.nvml.nvmlShutdown()
            self.handles = []
