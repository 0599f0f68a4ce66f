"""benchmarks/alignment.py stays runnable: its smoke mode runs here on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~17 s; the stages it times are each tested in the default run
def test_alignment_benchmark_smoke(tmp_path):
    script = ROOT / "benchmarks" / "alignment.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "alignment_cpu_smoke.json").read_text())
    assert result["threads"] == 1 and result["measured_steps"] >= 1
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"dpo_precomputed", "dpo_reference_model", "ppo"}
    for r in rows.values():
        assert r["tokens_per_step"] > 0 and r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_gb"] >= r["base_gb"] > 0 and r["cpu_per_wall"] > 0
    ppo = rows["ppo"]
    shares = ppo["generation_share"] + ppo["scoring_share"] + ppo["update_share"]
    assert 0 < ppo["generation_share"] < 1 and 0.9 < shares <= 1.0 + 1e-9
    assert rows["dpo_precomputed"]["reference_pass_tokens_per_s"] > 0
    assert "| step | tokens/step | s/step | tokens/s |" in proc.stdout
