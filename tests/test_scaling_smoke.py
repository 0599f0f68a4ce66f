"""benchmarks/scaling.py stays runnable: its smoke mode (tiny model, worlds 1 and 2) on CPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling_cpu.json").read_text())
    rows = {(r["world"], r["layout"]): r for r in result["rows"]}
    assert set(rows) == {(1, "single"), (2, "ddp"), (2, "fsdp"), (2, "tp"), (2, "tp_sp"), (2, "zero1"), (2, "zero2"),
                         (2, "zero3")}
    for r in rows.values():
        assert "skipped" not in r, r
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0
        assert len(r["peak_mib_per_rank"]) == r["world"] and all(m > 0 for m in r["peak_mib_per_rank"])
    assert rows[(2, "ddp")]["global_tokens_per_step"] == 2 * rows[(2, "tp")]["global_tokens_per_step"]
    assert "| world | layout | tokens/s |" in proc.stdout
