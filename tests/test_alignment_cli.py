"""`tessera sft | rm | dpo` end to end on checkable tasks, and DPO on 2 FSDP ranks against one process.

The preference: an answer in capitals beats the same answer in lower case; held-out pairs use
words never seen in training. SFT teaches a format rule (answers begin "Answer: ").
"""
import json
import os
import random
import subprocess
import sys

import pytest

from tessera.core.metrics import read_metrics

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COMMON = ["--model.n_layers=2", "--model.d_model=48", "--model.n_heads=4", "--model.n_kv_heads=2",
          "--model.norm=\"rmsnorm\"", "--model.pos=\"rope\"", "--model.mlp=\"swiglu\"", "--model.d_ff=96",
          "--model.max_seq_len=64", "--train.seq_len=48", "--log.every=5", "--log.progress=false",
          "--log.tensorboard=false", "--checkpoint.every=0", "--optim.warmup_steps=2", "--optim.lr=3e-3",
          "--optim.min_lr=3e-4", "--optim.weight_decay=0.0"]


def words(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE
    from tessera.core.tokenizer import train_char

    root = tmp_path_factory.mktemp("align")
    train_char([LETTERS + LETTERS.upper() + DEFAULT_CHAT_TEMPLATE + "say:#\n ,.reverseAnswer"]).save(root / "tok")
    seen = words(192, 0)
    held = [w for w in words(64, 1) if w not in set(seen)][:32]
    pair = lambda w: {"prompt": f"say {w}", "chosen": w.upper(), "rejected": w}  # noqa: E731
    write_jsonl(root / "pairs.jsonl", [pair(w) for w in seen])
    write_jsonl(root / "pairs_val.jsonl", [pair(w) for w in held])
    write_jsonl(root / "sft.jsonl", [{"instruction": f"reverse {w}", "output": w[::-1]} for w in seen])
    write_jsonl(root / "sft_val.jsonl", [{"instruction": f"reverse {w}", "output": w[::-1]} for w in held])
    write_jsonl(root / "fmt.jsonl", [{"instruction": f"say {w}", "output": f"Answer: {w}."} for w in seen])
    write_jsonl(root / "fmt_val.jsonl", [{"instruction": f"say {w}", "output": f"Answer: {w}."} for w in held])
    (root / "empty.toml").write_text("")
    return root


def tessera(*args, nproc=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "tessera", *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def stage(work, command, run, data, val, *extra, nproc=1):
    tessera(command, work / "empty.toml", *COMMON, f"--data.path={json.dumps(str(work / data))}",
            f"--align.val_path={json.dumps(str(work / val))}", f"--data.tokenizer={json.dumps(str(work / 'tok'))}",
            f"--train.run_dir={json.dumps(str(work / run))}", *extra, nproc=nproc)
    return read_metrics(work / run)


def final(records, key):
    return [r[key] for r in records if key in r][-1]


def test_reward_model_reaches_90_percent_held_out(work):
    records = stage(work, "rm", "rm", "pairs.jsonl", "pairs_val.jsonl", "--train.steps=36", "--train.batch_size=16",
                    "--eval.every=12", "--eval.batches=2")
    assert final(records, "val_accuracy") >= 0.9, records[-3:]


def test_dpo_raises_held_out_preference_accuracy_and_margin(work):
    records = stage(work, "dpo", "dpo", "pairs.jsonl", "pairs_val.jsonl", "--train.steps=36", "--train.batch_size=16",
                    "--eval.every=12", "--eval.batches=2", "--align.beta=0.5")
    baseline = [r for r in records if r["step"] == 0]
    # evaluated before step 1, where the policy is its reference: no margin (up to rounding)
    assert len(baseline) == 1 and abs(baseline[0]["val_margin"]) < 1e-4
    margins = [r["val_margin"] for r in records if "val_margin" in r and r["step"] > 0]
    assert final(records, "val_accuracy") >= 0.9 and margins[-1] > margins[0] > 0, records[-3:]


LORA = ["--lora.r=4", "--optim.lr=1e-2"]
FSDP2 = ["--train.batch_size=8", "--parallel.dp_shard=2"]
TP2 = ["--train.batch_size=16", "--parallel.tp=2", "--parallel.dp_shard=1"]  # sequence parallel and loss parallel


@pytest.mark.parametrize("run, lora, layout", [  # the default run keeps LoRA on TP (~15 s each)
    pytest.param("dpo", [], FSDP2, id="full", marks=pytest.mark.slow),
    pytest.param("dpo_lora", LORA, FSDP2, id="lora", marks=pytest.mark.slow),
    pytest.param("dpo_lora_tp", LORA, TP2, id="lora_tp")])
def test_dpo_on_two_ranks_matches_one_process(work, run, lora, layout):
    """LoRA on TP: each adapter sharded along the features its layer shards (`feature_dims`)."""
    args = ("dpo", "pairs.jsonl", "pairs_val.jsonl", "--train.steps=6", "--eval.every=0", "--log.every=1",
            "--align.beta=0.5", *lora)
    one = stage(work, args[0], f"{run}1", *args[1:], "--train.batch_size=16")
    two = stage(work, args[0], f"{run}2", *args[1:], *layout, nproc=2)
    l1, l2 = [r["loss"] for r in one if "loss" in r], [r["loss"] for r in two if "loss" in r]
    assert len(l1) == len(l2) == 6
    assert max(abs(a - b) / abs(a) for a, b in zip(l1, l2)) < 1e-4, (l1, l2)
    assert l1[-1] < l1[0]  # adapters alone move the policy too
    if lora:  # the merged export of the sharded run holds the one-process run's weights
        from safetensors.torch import load_file

        merged = [load_file(work / r / "merged" / "model.safetensors") for r in (f"{run}1", f"{run}2")]
        assert merged[0].keys() == merged[1].keys()
        assert max((merged[0][k] - merged[1][k]).abs().max().item() for k in merged[0]) < 1e-4


def format_rate(work, ckpt) -> float:
    """Share of held-out prompts whose greedy response follows the format ("Answer: ...")."""
    from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE, render
    from tessera.core.checkpoint import load_model_from_checkpoint
    from tessera.core.generate import generate_tokens
    from tessera.core.tokenizer import load_tokenizer

    model, tok = load_model_from_checkpoint(ckpt), load_tokenizer(work / "tok")
    records = [json.loads(line) for line in (work / "fmt_val.jsonl").read_text().splitlines()]
    prompts = [tok.encode(render(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": r["instruction"]}], True))
               for r in records]
    outputs = [tok.decode(generate_tokens(model, [p], 10, stop_ids=[tok.eos_id])[0]) for p in prompts]
    return sum(o.startswith("Answer: ") for o in outputs) / len(outputs)


def test_sft_learns_the_response_format(work):
    stage(work, "sft", "fmt0", "fmt.jsonl", "fmt_val.jsonl", "--train.steps=1", "--optim.lr=1e-9",
          "--optim.min_lr=0.0", "--model.max_seq_len=128", "--train.seq_len=96", "--eval.every=0")
    # fp32 (not "auto", bf16 only on some CPUs): the same arithmetic on every CI machine
    records = stage(work, "sft", "fmt", "fmt.jsonl", "fmt_val.jsonl", "--train.steps=300", "--train.batch_size=4",
                    "--optim.lr=1e-2", "--model.max_seq_len=128", "--train.seq_len=96", "--eval.every=100",
                    "--train.precision=fp32", "--eval.batches=2")
    assert format_rate(work, work / "fmt0") == 0.0
    assert format_rate(work, work / "fmt") >= 0.9, records[-1]


def test_sft_with_lora_trains_adapters_and_exports(work):
    records = stage(work, "sft", "sft", "sft.jsonl", "sft_val.jsonl", "--train.steps=60", "--train.batch_size=8",
                    "--eval.every=30", "--eval.batches=2", "--lora.r=8", "--lora.alpha=16.0", "--optim.lr=1e-2")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] and "val_ppl" in records[-1]
    assert (work / "sft" / "adapter" / "adapter.safetensors").exists()
    out = tessera("generate", "--ckpt", work / "sft" / "merged", "--prompt", "### user:\nreverse abc\n", "--seed", "0",
                  "--max-new-tokens", "5")
    assert out.startswith("### user:")


def test_bad_records_name_file_and_line(work):
    bad = write_jsonl(work / "bad.jsonl", [{"prompt": "say a", "chosen": "A", "rejected": "a"}, {"prompt": "x"}])
    proc = subprocess.run([sys.executable, "-m", "tessera", "dpo", work / "empty.toml", *COMMON,
                           f"--data.path={json.dumps(str(bad))}", f"--data.tokenizer={json.dumps(str(work / 'tok'))}",
                           f"--train.run_dir={json.dumps(str(work / 'bad'))}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad.jsonl:2: missing field(s) ['chosen', 'rejected']" in proc.stderr


def test_dpo_launched_through_tessera_launch_on_two_local_ranks(work):
    overrides = {"data.path": str(work / "pairs.jsonl"), "data.tokenizer": str(work / "tok"),
                 "train.run_dir": str(work / "launched"), "train.steps": 4, "train.batch_size": 8,
                 "eval.every": 0, "log.progress": False, "model.n_layers": 1, "model.d_model": 32,
                 "model.n_heads": 2, "model.max_seq_len": 64, "train.seq_len": 48}
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items())
    launch = work / "launch.toml"
    launch.write_text(f'[job]\nbackend = "local"\nname = "dpo-tiny"\nnproc_per_node = 2\n'
                      f'output_dir = {json.dumps(str(work / "jobs"))}\n[parallel]\ndp_shard = 2\n'
                      f'[recipe]\ncommand = "dpo"\npath = {json.dumps(str(work / "empty.toml"))}\n'
                      f'[recipe.overrides]\n{lines}')
    dry = tessera("launch", launch, "--dry-run")
    assert "-m tessera dpo" in dry and "--nproc_per_node" in dry
    tessera("launch", launch)
    last = read_metrics(work / "launched")[-1]
    assert last["step"] == 4 and 0 <= last["accuracy"] <= 1
