"""The single place that decides which implementation of a kernel runs.

Call sites (the model, the losses) never name a backend: they call the functions in
`tessera.kernels`, and this module picks the implementation from the configured backend
and the tensor's device. `auto` means Triton on CUDA when it is registered, torch elsewhere.
Implementations register themselves when their module is imported; a backend whose package
is missing (triton, flash-attn) is simply not registered, and asking for it is an error
that says how to get it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

OPS = ("attention", "layer_norm", "rms_norm", "cross_entropy", "linear_cross_entropy", "rope", "swiglu")
BACKENDS = ("auto", "torch", "triton", "flash_attn")
INSTALL_HINT = {
    "triton": "pip install 'triton==3.7.1' (Linux; on CPU tensors it runs under TRITON_INTERPRET=1)",
    "flash_attn": "pip install flash-attn (needs a CUDA build of torch); it provides attention only",
}

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


def _unavailable(op: str, backend: str) -> KernelBackendError:
    hint = f" ({INSTALL_HINT[backend]})" if backend in INSTALL_HINT else ""
    return KernelBackendError(
        f"kernel {op!r} has no {backend!r} implementation here{hint}; available: {', '.join(sorted(_registry[op]))}"
    )


def configure(backend: str = "auto", **per_op: str) -> None:
    """Set the default backend and per-op overrides (e.g. attention="torch"); checks that each
    explicitly named backend can run its op, so a missing package fails at start-up."""
    per_op = {op: name for op, name in per_op.items() if name}
    for name in (backend, *per_op.values()):
        if name not in BACKENDS:
            raise KernelBackendError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    for op, name in per_op.items():
        if op not in _registry:
            raise KernelBackendError(f"unknown kernel op {op!r}; valid: {', '.join(OPS)}")
        if name != "auto" and name not in _registry[op]:
            raise _unavailable(op, name)
    if backend != "auto" and not any(backend in impls for impls in _registry.values()):
        raise _unavailable(OPS[0], backend)
    global _default
    _default = backend
    _per_op.clear()
    _per_op.update(per_op)


@contextlib.contextmanager
def use(backend: str = "auto", **per_op: str) -> Iterator[None]:
    """`configure` for the duration of a block, then the run's own choice again (ONNX export traces
    the torch kernels whatever the run chose)."""
    saved_default, saved_per_op = _default, dict(_per_op)
    configure(backend, **per_op)
    try:
        yield
    finally:
        configure(saved_default, **saved_per_op)


def implementation(op: str, backend: str) -> Callable:
    """A named backend's implementation of `op` (benchmarks compare them side by side)."""
    if backend not in _registry[op]:
        raise _unavailable(op, backend)
    return _registry[op][backend]


def available(op: str) -> list[str]:
    return sorted(_registry[op])


def current() -> dict[str, str]:
    """The configured backend of every op (before `auto` is resolved)."""
    return {op: _per_op.get(op, _default) for op in OPS}


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of `op` for tensors on `device`.

    A default backend that lacks `op` (flash_attn has attention only) falls back to `auto`
    for that op; a backend named for the op itself must provide it.
    """
    impls = _registry[op]
    backend = _per_op.get(op)
    if backend is None:
        backend = _default if _default in impls else "auto"
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and "triton" in impls else "torch"
    try:
        return impls[backend]
    except KeyError:
        raise _unavailable(op, backend) from None
