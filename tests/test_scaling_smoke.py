"""benchmarks/scaling.py stays runnable: its smoke mode (tiny model, worlds 1 and 2) on CPU. The
default run launches the single process and two layouts; `--runslow` every layout."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def scaling_rows(out: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "scaling_cpu.json").read_text())
    rows = {(r["world"], r["layout"]): r for r in result["rows"]}
    for r in rows.values():
        assert "skipped" not in r, r
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0
        assert len(r["peak_mib_per_rank"]) == r["world"] and all(m > 0 for m in r["peak_mib_per_rank"])
    assert "| world | layout | tokens/s |" in proc.stdout
    return rows, proc.stdout


def test_scaling_benchmark_smoke(tmp_path):
    rows, _ = scaling_rows(tmp_path, "--layouts", "single", "ddp", "tp")
    assert set(rows) == {(1, "single"), (2, "ddp"), (2, "tp")}
    assert rows[(2, "ddp")]["global_tokens_per_step"] == 2 * rows[(2, "tp")]["global_tokens_per_step"]


@pytest.mark.slow
def test_scaling_benchmark_smoke_every_layout(tmp_path):
    rows, _ = scaling_rows(tmp_path)
    assert set(rows) == {(1, "single"), (2, "ddp"), (2, "fsdp"), (2, "tp"), (2, "tp_sp"), (2, "zero1"), (2, "zero2"),
                         (2, "zero3")}
    assert rows[(2, "ddp")]["global_tokens_per_step"] == 2 * rows[(2, "tp")]["global_tokens_per_step"]
