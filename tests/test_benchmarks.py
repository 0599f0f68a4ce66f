"""The benchmark harnesses stay runnable: their smoke modes run here on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"layer_norm", "rms_norm", "cross_entropy", "attention fwd", "attention fwd+bwd"}
    tessera_rows = [r for r in rows if r["provider"] == "tessera"]
    assert len(tessera_rows) == 5 and all("error" not in r and r["ms"] > 0 for r in tessera_rows)
    assert all(r["flops"] > 0 and r["bytes"] > 0 for r in rows)
    streamed = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert streamed == rows  # one line per case, written as it finished
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| kernel | size | provider |" in (tmp_path / "results.md").read_text()


def test_memory_benchmark_small(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_ce.py"), "--tokens", "2048", "--width", "256",
                           "--vocab", "32000", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "memory_ce_cpu.json").read_text())["rows"]
    assert row["fused_gb"] < row["unfused_gb"]


def test_recipe_speed_benchmark_smoke(tmp_path):
    """A few steps of the strong eager loop and of the recipe as `tessera train` runs it: one JSON line
    per row (wall time, tokens/s, validation loss, the CPU) and the table against the eager loop."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_speed.py"), "--steps", "12",
                           "--rows", "eager_gpt2", "recipe_cold", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "recipe_speed.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["eager_gpt2", "recipe_cold"]
    for r in rows:
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["val_loss"] < 10 and r["cpu"]
    assert "precision" in rows[1]["speed"] and "| recipe_cold |" in proc.stdout


def test_vision_encoder_benchmark_small(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vision_encoder.py"), "--batch", "2", "--steps", "1",
                           "--layers", "1", "--width", "32", "--image-size", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "vision_encoder.json").read_text())
    assert result["encoder"]["tokens"] == 5 and [r["batch"] for r in result["rows"]] == [2]
    assert all(r["images_per_s"] > 0 for r in result["rows"]) and "| batch | images/s |" in proc.stdout


def test_vlm_train_benchmark_small(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vlm_train.py"), "--batch", "2", "--steps", "1",
                           "--image-size", "8", "--patch-size", "4", "--width", "32", "--text", "6", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "vlm_train.json").read_text())
    assert [(r["fusion"], r["stage"]) for r in result["rows"]] == [
        ("prefix", "align"), ("prefix", "instruct"), ("cross_attention", "align"), ("cross_attention", "instruct")]
    assert result["rows"][0]["tokens_per_step"] == 2 * (4 + 6)  # 4 patch tokens (mean pool) + 6 text
    assert all(r["tokens_per_s"] > 0 for r in result["rows"]) and "| fusion | stage |" in proc.stdout


def test_cpu_floor_counts_the_models_own_flops(tmp_path):
    """The floor's products are every matmul of a step: their FLOPs equal the model's own count
    (6 x the matrices' parameters, LM head included, + attention's score and value products)."""
    from benchmarks.cpu_floor import recipe_config, step_products
    from tessera.core.model import Transformer

    for blocks in ("llama", "gpt2"):
        cfg = recipe_config(blocks, vocab_size=65)
        with torch.device("meta"):
            model = Transformer(cfg.model)
        tokens = cfg.train.batch_size * cfg.train.seq_len
        vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # norms: counted by 6N, no matmul
        expected = tokens * (model.flops_per_token(cfg.train.seq_len) - 6 * vectors)
        assert sum(2 * b * m * k * n for b, m, k, n in step_products(cfg)) == expected
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_floor.py"), "--repeats", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cpu_floor.jsonl").read_text().splitlines()]
    assert [(r["blocks"], r["dtype"]) for r in rows] == [("llama", "float32"), ("llama", "bfloat16"),
                                                         ("gpt2", "float32"), ("gpt2", "bfloat16")]
    assert all(r["floor_tokens_per_s"] > 0 for r in rows) and "| floor tokens/s |" in proc.stdout


def test_block_step_benchmark_times_one_block_against_the_whole_step(tmp_path):
    """Eager fp32 (compilation is the slow path's to check): the four blocks are most of a step but not
    more than all of it, and an uncompiled run reports no region cost."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "block_step.py"), "--repeats", "5", "--steps", "5",
                           "--eager-tokens-per-s", "20000", "--out", str(tmp_path), "--train.precision=fp32",
                           "--train.compile=false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "block_step.jsonl").read_text())
    assert (row["precision"], row["compile"], row["tokens_per_step"]) == ("fp32", False, 12 * 64)
    block = row["block_forward_ms"] + row["block_backward_ms"]
    assert row["block_forward_ms"] > 0 and row["block_backward_ms"] > 0
    assert row["blocks_ms_per_step"] == pytest.approx(4 * block)
    assert row["region_ms_per_block"] == 0.0
    assert "| block forward ms |" in proc.stdout and "2.0x the eager loop (38.4 ms a step) allows 19.2 ms" in proc.stdout
