"""How fast a run goes on the hardware it finds: `train.precision` and `train.compile` resolved
from "auto", regional compilation of the transformer blocks, and torch's persistent compile cache.

"auto" precision is bf16 autocast where the device computes bf16 natively (CUDA with bf16;
a CPU with AVX512-BF16 or AMX, read from its flags at start-up), fp32 elsewhere: emulated
bf16 is slower than fp32. "auto" compile compiles one process's fixed-shape runs of at least
`COMPILE_MIN_STEPS` steps, where the one-off compilation is repaid; a progressive sequence length
(train.seq_len_schedule) is not fixed-shape: each phase would compile its graphs anew, so "auto"
leaves it eager (an explicit true compiles, and recompiles at each phase).
Compiled code is cached under `compile_cache_dir()`, so the second run of a recipe starts compiled.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.config import Config

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 (/proc/cpuinfo "flags")
ARM_BF16_FLAGS = ("bf16",)  # aarch64 (/proc/cpuinfo "Features")
COMPILE_MIN_STEPS = 1000  # below this a cold compilation (tens of seconds of g++ on a laptop CPU) is not repaid


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them; empty where there is no /proc/cpuinfo."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device, flags: Callable[[], frozenset[str]] = cpu_flags) -> bool:
    """Whether `device` computes bf16 matmuls in hardware (rather than emulating them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(flags() & {*CPU_BF16_FLAGS, *ARM_BF16_FLAGS})
    return False


def resolve(cfg: Config, device: torch.device, world_size: int, static_shapes: bool,
            flags: Callable[[], frozenset[str]] = cpu_flags) -> tuple[Config, str]:
    """`cfg` with train.precision and train.compile decided, and one line saying what was chosen and why.

    Multi-rank runs take "auto" as fp32 and no compilation: their precision is FSDP's policy
    (parallel.mixed_precision) or an explicit train.precision, and compiled blocks under FSDP's
    hooks are not supported by this resolution."""
    t = cfg.train
    precision, why_precision = t.precision, "set"
    if precision == "auto":
        native = world_size == 1 and native_bf16(device, flags)
        precision = "bf16" if native else "fp32"
        why_precision = _precision_reason(device, world_size, native, flags)
    compile_, why_compile = t.compile, "set"
    if compile_ == "auto":
        long_enough = t.steps >= COMPILE_MIN_STEPS
        phases = len(t.seq_lens) > 1
        compile_ = (world_size == 1 and static_shapes and not phases and long_enough
                    and cfg.parallel.engine == "fsdp")
        why_compile = ("regional, cache in " + str(compile_cache_dir()) if compile_ else
                       "off: " + ("several ranks" if world_size > 1 else "shapes vary" if not static_shapes
                                  else "train.seq_len_schedule changes the shapes" if phases
                                  else f"train.steps < {COMPILE_MIN_STEPS}"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, precision=precision, compile=compile_))
    return cfg, f"precision {precision} ({why_precision}); compile {str(compile_).lower()} ({why_compile})"


def _precision_reason(device: torch.device, world_size: int, native: bool,
                      flags: Callable[[], frozenset[str]]) -> str:
    if world_size > 1:
        return "auto: several ranks; set train.precision or parallel.mixed_precision"
    if device.type == "cpu":
        found = sorted(flags() & {*CPU_BF16_FLAGS, *ARM_BF16_FLAGS})
        return f"auto: CPU has {', '.join(found)}" if native else "auto: this CPU has no native bf16"
    return f"auto: {device.type} {'has' if native else 'lacks'} native bf16"


def retain_freed_memory() -> bool:
    """Keep the memory a CPU step frees inside the process for the next step (glibc: blocks up to
    32 MiB from the heap rather than mmap, and the heap never trimmed). A step frees and allocates
    the same activation buffers every time; given back to the kernel, each returns as fresh pages
    that fault in one by one (measured on the Shakespeare recipe: ~2,700 page faults a step and
    15% of its time). Returns whether it applied: only where the C library has `mallopt` (glibc)."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process runs on
    except (OSError, TypeError):  # no such handle (Windows)
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def compile_cache_dir() -> Path:
    """Where torch keeps compiled code between runs: TORCHINDUCTOR_CACHE_DIR when the user set it,
    else $TESSERA_CACHE_DIR/inductor, else $XDG_CACHE_HOME/tessera/inductor (~/.cache/tessera/inductor).
    (torch itself exports its default, a per-user directory in /tmp, once it has looked it up.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # torch._inductor: seconds to import

    torch_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if torch_dir and Path(torch_dir) != Path(default_cache_dir()):
        return Path(torch_dir)
    root = os.environ.get("TESSERA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tessera"
    return Path(root) / "inductor"


def compile_blocks(model: nn.Module, block_type: type[nn.Module]) -> None:
    """Compile every `block_type` module of `model` in place (regional compilation): all blocks of
    one shape share one graph, compiled once, and state-dict keys stay as they are. The persistent
    FX-graph and AOTAutograd caches are kept on, in `compile_cache_dir()`."""
    import torch._functorch.config
    import torch._inductor.config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    device = next(model.parameters()).device
    if device.type == "cpu" and torch._inductor.config.cpp.vec_isa_ok is None:
        # Trust the vector ISAs the CPU reports rather than test-compiling a program for each (AVX-512,
        # AVX2, AMX): about 10 of the 35 seconds of a first compilation on a 2-core laptop CPU.
        torch._inductor.config.cpp.vec_isa_ok = True
    if device.type == "cpu":
        pick_vector_isa_in_background()
    # On CPU one C++ file per graph (cpp_wrapper) rather than one per kernel: about half the cold
    # compilation (g++ runs, each with its own start-up) and less Python around the kernels. No
    # precompiled header: building torch's (once per machine, compiler and flags) costs a first run
    # more than it saves the two graphs compiled after it. Measured on the Shakespeare recipe, start-up
    # and first step: empty caches 19.0 -> 16.3 s, a warm start's first step 1.2-1.3 -> 1.1 s; 14.3 ->
    # 16.3 s only where another program had already built the header and this recipe was not compiled.
    options = {"cpp_wrapper": True, "cpp_cache_precompile_headers": False} if device.type == "cpu" else {}
    for module in model.modules():
        if isinstance(module, block_type):
            module.compile(options=options)


def pick_vector_isa_in_background() -> threading.Thread:
    """Start inductor's choice of the CPU's vector instructions on another thread. The extensions
    beyond the base ISA (AVX512-BF16, VNNI, AMX) are each checked by building a small program and
    loading it in a subprocess the first time a graph is generated: six g++ runs on a Xeon with AMX,
    2 s of a cold start, and six loads at every start. Begun when the blocks are wrapped, the builds
    run on the second core while the first traces the model; inductor's own call finds them built
    (or waits on their locks) and keeps the answer (`valid_vec_isa_list` is cached). Measured on the
    Shakespeare recipe's cold first step: 15.6 s to 14.4 s. A failure here is left to that call, which
    makes the same checks and reports it. (Were that call to enter the AVX-512 check while this thread is
    in it, inductor's shared flag string could keep one flag twice: a different cache key, the same code.)"""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    def pick() -> None:
        try:
            pick_vec_isa()
        except Exception:  # noqa: BLE001 - inductor repeats the check on its own thread and raises there
            return

    thread = threading.Thread(target=pick, name="tessera-pick-vector-isa", daemon=True)
    thread.start()
    return thread
