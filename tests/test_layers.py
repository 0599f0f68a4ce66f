"""The layering contract (.importlinter, checked by import-linter): it holds for the package, and it
fails, naming the offending line, when an upward import is planted, also inside a function."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--config", str(root / ".importlinter"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": ""})


def test_the_package_keeps_every_contract():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module, planted, contract, edge", [
    ("core/optim.py", "from tessera.distributed import env", "core imports only kernels",
     "tessera.core.optim -> tessera.distributed.env"),
    ("kernels/dispatch.py", "from tessera.core import config", "kernels import nothing of tessera",
     "tessera.kernels.dispatch -> tessera.core.config"),
    ("launchers/torchrun.py", "from tessera.core import trainer", "launchers build commands and never import",
     "tessera.launchers.torchrun -> tessera.core.trainer"),
    ("distributed/mesh.py", "import tessera.alignment.lora_lm", "Layers: nothing imports a package above its own",
     "tessera.distributed.mesh -> tessera.alignment.lora_lm"),
    ("alignment/rows.py", "from tessera.interop import quantize", "Layers: nothing imports a package above its own",
     "tessera.alignment.rows -> tessera.interop.quantize"),
    ("multimodal/images.py", "from tessera.alignment import stage", "Layers: nothing imports a package above its own",
     "tessera.multimodal.images -> tessera.alignment.stage"),
])
def test_a_planted_upward_import_inside_a_function_breaks_the_build(tmp_path, module, planted, contract, edge):
    shutil.copytree(ROOT / "tessera", tmp_path / "tessera", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    path = tmp_path / "tessera" / module
    lines = path.read_text().splitlines()
    line = len(lines) + 3
    path.write_text("\n".join([*lines, "", "", "def _planted():", f"    {planted}", ""]))
    proc = lint(tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert f"{contract}" in out and "BROKEN" in out
    assert edge in out and f"l.{line + 1}" in out, out[-3000:]
