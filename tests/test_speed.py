"""`train.precision` and `train.compile` = "auto" resolve from the hardware as documented (the CPU's
flags read through a mocked reader), explicit values are kept, and the compile cache has a known home."""
import pytest
import torch

from tessera.core import speed
from tessera.core.config import CONFIG_DIR as CONFIGS
from tessera.core.config import ConfigError, load_config

CPUINFO_X86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\nprocessor\t: 1\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n"


def cfg(*overrides, steps=2000):
    return load_config(None, [f"--train.steps={steps}", "--train.precision=auto", "--train.compile=auto", *overrides])


def resolved(config, flags=frozenset(), world_size=1, static_shapes=True, device="cpu"):
    out, line = speed.resolve(config, torch.device(device), world_size, static_shapes, flags=lambda: frozenset(flags))
    return out.train.precision, out.train.compile, line


@pytest.mark.parametrize("template,extra,expected", [
    (CPUINFO_X86, "avx512_bf16 avx512_vnni", {"avx512_bf16"}),
    (CPUINFO_X86, "amx_bf16 amx_tile", {"amx_bf16"}),
    (CPUINFO_X86, "", set()),
    (CPUINFO_ARM, "bf16 i8mm", {"bf16"}),
])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path, template, extra, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(template.format(extra=extra))
    flags = speed.cpu_flags(str(path))
    assert flags & {"avx512_bf16", "amx_bf16", "bf16"} == expected
    assert "fpu" in flags or "fp" in flags
    assert speed.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("flags,expected", [({"avx512_bf16"}, "bf16"), ({"amx_bf16", "avx512f"}, "bf16"),
                                            ({"bf16"}, "bf16"), ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(flags, expected):
    precision, _, line = resolved(cfg(), flags)
    assert precision == expected
    assert f"precision {expected}" in line
    assert ("CPU has " + ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}))) in line if expected == "bf16" \
        else "no native bf16" in line


def test_auto_precision_is_fp32_on_several_ranks_and_explicit_values_are_kept():
    assert resolved(cfg(), {"avx512_bf16"}, world_size=2)[0] == "fp32"
    assert resolved(cfg("--train.precision=fp32"), {"avx512_bf16"})[0] == "fp32"
    assert resolved(cfg("--train.precision=bf16"), set())[0] == "bf16"


def test_auto_compile_only_for_long_fixed_shape_single_process_runs():
    long_run = cfg(steps=speed.COMPILE_MIN_STEPS)
    assert resolved(long_run)[1] is True
    assert resolved(cfg(steps=speed.COMPILE_MIN_STEPS - 1))[1] is False
    assert resolved(long_run, static_shapes=False)[1] is False
    assert resolved(long_run, world_size=2)[1] is False
    assert resolved(cfg("--train.compile=false"))[1] is False
    assert resolved(cfg("--train.compile=true", steps=10))[1] is True


def test_compile_takes_true_false_and_auto_and_nothing_else(tmp_path):
    path = tmp_path / "run.toml"
    for text, expected in (("true", True), ("false", False), ('"auto"', "auto")):
        path.write_text(f"[train]\ncompile = {text}\n")
        assert load_config(path).train.compile == expected
    recipe = load_config(CONFIGS / "recipes" / "shakespeare" / "train.toml")
    assert recipe.train.compile == "auto" and recipe.train.precision == "auto"
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ['--train.compile="yes"'])


def test_compile_cache_dir_is_the_users_then_tesseras_then_xdg(monkeypatch, tmp_path):
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TESSERA_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert speed.compile_cache_dir() == tmp_path / "home" / ".cache" / "tessera" / "inductor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert speed.compile_cache_dir() == tmp_path / "xdg" / "tessera" / "inductor"
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "t"))
    assert speed.compile_cache_dir() == tmp_path / "t" / "inductor"
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's own default, exported by torch
    assert speed.compile_cache_dir() == tmp_path / "t" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert speed.compile_cache_dir() == tmp_path / "mine"


FAULTS_PER_STEP = """
import resource, sys
import torch
from tessera.core.speed import retain_freed_memory
print(retain_freed_memory() if sys.argv[1] == "retain" else False)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
x = torch.randn(512, 256)
def step():
    net(x).square().mean().backward()
    for p in net.parameters():
        p.grad = None
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_retained_memory_stops_the_page_faults_of_a_training_step():
    """A step that frees and re-allocates its 2 MiB activations faults in fresh pages every time under
    glibc's defaults (about 500 a step here); with the freed memory kept, next to none (fresh processes,
    since the setting is process-wide and cannot be undone)."""
    import subprocess
    import sys

    def run(mode: str) -> tuple[bool, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied == "True", float(faults)

    applied, retained = run("retain")
    if not applied:
        pytest.skip("the C library has no mallopt (not glibc)")
    _, default = run("default")
    assert retained < 128, (retained, default)  # pages a step: under 512 KiB of fresh memory


def test_compiling_cpu_blocks_picks_the_vector_isa_on_another_thread(monkeypatch):
    """Wrapping CPU blocks starts inductor's ISA checks in the background (and nothing on other devices),
    and the thread leaves inductor's cached list of valid ISAs filled, the same list a fresh check gives."""
    from torch._inductor import cpu_vec_isa

    started = []
    monkeypatch.setattr(speed, "pick_vector_isa_in_background", lambda: started.append(True))
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    speed.compile_blocks(model, torch.nn.Linear)
    assert started == [True]
    assert all(m._compiled_call_impl is not None for m in model)
    with torch.device("meta"):
        elsewhere = torch.nn.Sequential(torch.nn.Linear(3, 5))
    speed.compile_blocks(elsewhere, torch.nn.Linear)
    assert started == [True] and elsewhere[0]._compiled_call_impl is not None
    monkeypatch.undo()

    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    thread = speed.pick_vector_isa_in_background()
    thread.join(timeout=300)
    assert not thread.is_alive()
    info = cpu_vec_isa.valid_vec_isa_list.cache_info()
    assert (info.misses, info.currsize) == (1, 1)
    found = cpu_vec_isa.valid_vec_isa_list()
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    assert [str(isa) for isa in found] == [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]


NO_HEADER = """
import os, sys
import torch
from tessera.core import speed
from torch._inductor.codecache import _HEADER_DIR
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(x)) * x


model = torch.nn.Sequential(Block())
speed.compile_blocks(model, Block)
x = torch.randn(4, 8, requires_grad=True)
model(x).sum().backward()
headers = [f for _, _, files in os.walk(_HEADER_DIR) for f in files if f.endswith((".gch", ".pch"))]
print(_HEADER_DIR.startswith(sys.argv[1]), len(headers))
"""


def test_compiled_cpu_blocks_build_no_precompiled_header(tmp_path):
    """A first compilation of CPU blocks (fresh temporary directory, where torch keeps its precompiled
    headers, and a fresh cache) compiles and runs without building torch's precompiled header."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-c", NO_HEADER, str(tmp_path / "tmp")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "0"]
