"""The single place that decides which implementation of a kernel runs.

Call sites (the model, the losses) never name a backend: they call the functions in
`tessera.kernels`, and this module picks the implementation from the configured backend
and the tensor's device. `auto` means Triton on CUDA when it is registered, torch elsewhere.
"""
from __future__ import annotations

from typing import Callable

import torch

OPS = ("attention", "layer_norm", "rms_norm", "cross_entropy", "linear_cross_entropy")
BACKENDS = ("auto", "torch")

_registry: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
_default = "auto"
_per_op: dict[str, str] = {}


class KernelBackendError(ValueError):
    """A backend was asked for that is unknown or cannot run here."""


def register(op: str, backend: str, fn: Callable) -> None:
    """Make `fn` the implementation of `op` under `backend`."""
    if op not in _registry:
        raise KernelBackendError(f"unknown kernel op {op!r}; valid: {', '.join(OPS)}")
    _registry[op][backend] = fn


def configure(backend: str = "auto", **per_op: str) -> None:
    """Set the default backend and optional per-op overrides (e.g. attention="torch")."""
    for name in (backend, *per_op.values()):
        if name not in BACKENDS:
            raise KernelBackendError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    for op in per_op:
        if op not in _registry:
            raise KernelBackendError(f"unknown kernel op {op!r}; valid: {', '.join(OPS)}")
    global _default
    _default = backend
    _per_op.clear()
    _per_op.update(per_op)


def current() -> dict[str, str]:
    """The configured backend of every op (before `auto` is resolved)."""
    return {op: _per_op.get(op, _default) for op in OPS}


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of `op` for tensors on `device`."""
    backend = _per_op.get(op, _default)
    impls = _registry[op]
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and "triton" in impls else "torch"
    try:
        return impls[backend]
    except KeyError:
        raise KernelBackendError(
            f"kernel {op!r} has no {backend!r} implementation; available: {', '.join(sorted(impls))}"
        ) from None
