"""The `tessera` command end to end, as a user runs it: real processes, real files."""
import json
import subprocess
import sys

import pytest

from tests.conftest import CORPUS

TESSERA = [sys.executable, "-m", "tessera"]


def run(*args, ok=True):
    proc = subprocess.run([*TESSERA, *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus_text):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(corpus_text)
    return root


@pytest.fixture(scope="module")
def trained(workdir):
    run("tokenizer", "train", "--kind", "char", workdir / "corpus.txt", "--out", workdir / "tok")
    run("data", "prepare", "--input", workdir / "corpus.txt", "--tokenizer", workdir / "tok",
        "--out", workdir / "data", "--shard-tokens", "20000")
    config = workdir / "tiny.toml"
    config.write_text(
        "[model]\nn_layers = 1\nn_heads = 2\nd_model = 32\nmax_seq_len = 32\n"
        f"[data]\npath = {json.dumps(str(workdir / 'data'))}\n"
        f"[train]\nrun_dir = {json.dumps(str(workdir / 'run'))}\nsteps = 20\nbatch_size = 4\nseq_len = 32\n"
        "[eval]\nevery = 10\nbatches = 2\n[checkpoint]\nevery = 10\n[log]\nevery = 5\n"
    )
    out = run("train", config, "--optim.lr=3e-3")
    assert "trained steps 0..20" in out.stdout
    return workdir, config


def test_train_writes_the_run_directory(trained):
    workdir, _ = trained
    run_dir = workdir / "run"
    assert (run_dir / "config.toml").exists() and (run_dir / "metrics.jsonl").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    ckpt = run_dir / "checkpoints" / "step_000020"
    assert {"model.safetensors", "config.json", "trainer_state.pt", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}


def test_resume_auto_continues_from_the_newest_checkpoint(trained):
    workdir, config = trained
    out = run("train", config, "--optim.lr=3e-3", "--train.steps=25", "--resume", "auto")
    assert "trained steps 20..25" in out.stdout


def test_generate_streams_text(trained):
    workdir, _ = trained
    ckpt = workdir / "run" / "checkpoints" / "step_000020"
    out = run("generate", "--ckpt", ckpt, "--prompt", "KING", "--max-new-tokens", "40", "--seed", "1")
    assert out.stdout.startswith("KING") and len(out.stdout) > 20
    greedy = [run("generate", "--ckpt", ckpt, "--prompt", "KING", "--max-new-tokens", "25", "--temperature", "0",
                  *flag).stdout for flag in ([], ["--no-cache"])]
    assert greedy[0] == greedy[1]


def test_eval_perplexity_and_plot(trained):
    workdir, _ = trained
    ckpt = workdir / "run" / "checkpoints" / "step_000020"
    result = json.loads(run("eval", "perplexity", "--ckpt", ckpt, "--data", workdir / "data").stdout)
    assert result["perplexity"] > 1 and result["tokens"] > 0
    first = json.loads(run("eval", "perplexity", "--ckpt", ckpt, "--data", workdir / "data", "--max-batches", "1",
                           "--batch-size", "2", "--seq-len", "16").stdout)
    assert first["tokens"] == 2 * 16 < result["tokens"]
    run("plot", workdir / "run")
    png = workdir / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_text(tmp_path):
    (tmp_path / "p.txt").write_text("the cat sat\nhello world\n")
    (tmp_path / "r.txt").write_text("the cat sat\nhello there world\n")
    scores = json.loads(run("eval", "text", "--pred", tmp_path / "p.txt", "--ref", tmp_path / "r.txt").stdout)
    assert set(scores) == {"bleu", "rouge1", "rouge2", "rougeL"}
    (tmp_path / "r.txt").write_text("one line\n")
    bad = run("eval", "text", "--pred", tmp_path / "p.txt", "--ref", tmp_path / "r.txt", ok=False)
    assert bad.returncode == 2 and "must pair up" in bad.stderr


def test_bpe_tokenizer_command(workdir):
    run("tokenizer", "train", "--vocab-size", "300", workdir / "corpus.txt", "--out", workdir / "bpe")
    assert json.loads((workdir / "bpe" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


@pytest.mark.parametrize("args, message", [
    (["generate", "--ckpt", "/nonexistent"], "is not a checkpoint and holds none"),
    (["data", "prepare", "--input", "/nonexistent.txt", "--tokenizer", "x", "--out", "y"], "no tokenizer at"),
    (["train", "/nonexistent.toml"], "does not exist"),
    (["tokenizer", "train", str(CORPUS), "--out", "/tmp/x"], "--vocab-size is required"),
    (["plot", "/nonexistent"], "no metrics.jsonl"),
    (["generate", "--ckpt", "x", "--model.lr=1"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = run(*args, ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_divergence_exits_1_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    workdir, config = trained
    proc = run("train", config, f"--train.run_dir={json.dumps(str(tmp_path))}", "--optim.lr=1e30",
               "--optim.min_lr=1e30", "--train.max_bad_steps=2", "--checkpoint.every=1", ok=False)
    assert proc.returncode == 1 and "non-finite losses in a row" in proc.stderr
    kept = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert kept and all((tmp_path / "checkpoints" / k / "model.safetensors").exists() for k in kept)


def test_plan_command(capsys):
    from tessera.cli.main import main

    assert main(["plan", "--model", "llama-70b", "--gpus", "256", "--gpu-mem", "80", "--seq", "8192",
                 "--dp-shard", "32", "--tp", "8", "--ac", "full"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = out[-1]
    assert row.startswith("fsdp r1 s32 tp8 ac=full bf16") and " yes " in row
    assert out[0].startswith("assuming 989 TFLOP/s bf16 at 40% MFU, 400 GB/s within a node")
    assert main(["plan", "--model", "llama-8b", "--gpus", "8", "--seq", "8192", "--gpu", "a100", "--mfu", "0.5",
                 "--inter-bw", "25"]) == 0
    assert capsys.readouterr().out.startswith("assuming 312 TFLOP/s bf16 at 50% MFU, 250 GB/s within a node of 8 "
                                              "and 25 GB/s between nodes, 80 GiB per GPU")
    assert main(["plan", "--model", "llama-8b", "--gpus", "8", "--seq", "8192", "--mfu", "1.5"]) == 2
    assert main(["plan", "--model", "llama-70b", "--gpus", "8", "--gpu-mem", "80", "--seq", "8192"]) == 2
    assert "no layout of llama-70b fits 8 GPUs" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt2-124m", "--gpus", "8", "--gpu-mem", "80", "--seq", "1024", "--tp", "5"]) == 2
    assert capsys.readouterr().err.startswith("tessera: error:")


def test_a_fresh_run_into_a_used_run_dir_is_refused_unless_overwritten(trained, tmp_path):
    """Training again into a run_dir with checkpoints would leave the old step_N beside the new ones
    (and `generate`/`--resume auto` would pick the stale one)."""
    workdir, config = trained
    run_dir = f"--train.run_dir={json.dumps(str(tmp_path / 'run'))}"
    run("train", config, run_dir, "--train.steps=10")
    refused = run("train", config, run_dir, "--train.steps=5", ok=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "already holds a run (newest checkpoint step_000010)" in refused.stderr and "--overwrite" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000010"]
    out = run("train", config, run_dir, "--train.steps=5", "--overwrite")
    assert "removed the earlier run's checkpoints" in out.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000005"]
    assert max(r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())) == 5


def test_resume_says_where_it_resumed_what_changed_and_when_nothing_is_left(trained, tmp_path):
    workdir, config = trained
    run_dir = f"--train.run_dir={json.dumps(str(tmp_path / 'run'))}"
    run("train", config, run_dir, "--train.steps=10")
    out = run("train", config, run_dir, "--train.steps=15", "--resume", "auto")
    assert "resumed from step 10" in out.stdout and "train.steps 10 -> 15" in out.stdout
    done = run("train", config, run_dir, "--train.steps=15", "--resume", "auto")
    assert "the run is already finished: step 15 of train.steps=15" in done.stdout
    past = run("train", config, run_dir, "--train.steps=5", "--resume", "auto", ok=False)
    assert past.returncode == 2 and "is at step 15, past train.steps=5" in past.stderr


def test_a_preset_on_the_command_line_replaces_the_files_model_and_a_larger_vocab_is_stated(trained, tmp_path):
    from tessera.core.config import load_config

    workdir, config = trained
    cfg = load_config(config, ["--model.preset='gpt2-124m'", "--model.n_layers=2"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.max_seq_len, cfg.model.vocab_size) == (768, 2, 1024, 50257)
    out = run("train", config, f"--train.run_dir={json.dumps(str(tmp_path / 'v'))}", "--train.steps=1",
              "--model.vocab_size=200", "--eval.every=0")
    assert "model.vocab_size=200 is larger than the tokenizer's" in out.stdout


def test_help_lists_every_command_in_one_line_and_train_lists_the_config_keys():
    out = run("--help").stdout
    commands = ["tokenizer", "data", "train", "sft", "rm", "dpo", "ppo", "grpo", "clip", "vlm", "recipe", "generate", "eval", "plot",
                "critique", "cot", "plan", "launch", "jobs", "convert", "export", "quantize", "serve"]
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    assert listed == commands, out
    assert run("--version").stdout.startswith("tessera ")
    train_help = run("train", "--help").stdout
    assert "[optim] lr, min_lr" in train_help and "[rl] reward_model" in train_help and "--overwrite" in train_help


def test_eval_perplexity_takes_an_int8_checkpoint(trained):
    workdir, _ = trained
    ckpt = workdir / "run" / "checkpoints" / "step_000020"
    args = ["--data", workdir / "data", "--max-batches", "2", "--batch-size", "2", "--seq-len", "16"]
    full = json.loads(run("eval", "perplexity", "--ckpt", ckpt, *args).stdout)
    run("quantize", ckpt, workdir / "int8", "--int8")
    int8 = json.loads(run("eval", "perplexity", "--ckpt", workdir / "int8", *args).stdout)
    assert int8["tokens"] == full["tokens"] and abs(int8["perplexity"] / full["perplexity"] - 1) < 0.05
