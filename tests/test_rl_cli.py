"""`tessera grpo | ppo` end to end: a tiny char-level policy from random init learns to answer with
the letter 'a' (reward: tests/rl_rewards.py, imported by the run as `rl_rewards:fraction_of_a`),
on one process and on FSDP and TP ranks; runs resume; the final checkpoint generates; bad input
exits 2."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.core.metrics import read_metrics

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import rl_rewards  # noqa: E402
from rl_task import summary  # noqa: E402

COMMON = ["--model.n_layers=2", "--model.d_model=48", "--model.n_heads=4", "--model.n_kv_heads=2",
          "--model.norm=\"rmsnorm\"", "--model.pos=\"rope\"", "--model.mlp=\"swiglu\"", "--model.d_ff=96",
          "--model.max_seq_len=32", "--train.seq_len=16", "--train.device=\"cpu\"", "--log.every=1",
          "--log.progress=false", "--log.tensorboard=false", "--optim.warmup_steps=0", "--optim.lr=3e-3",
          "--optim.schedule=\"constant\"", "--optim.weight_decay=0.0", "--rl.reward_fn=\"rl_rewards:fraction_of_a\"",
          "--rl.chat_template=false", "--rl.max_new_tokens=8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    rl_rewards.TOKENIZER.save(root / "tok")
    rng = random.Random(0)
    lines = [{"prompt": "".join(rng.choice(rl_rewards.LETTERS) for _ in range(rng.randint(2, 5))) + ":"}
             for _ in range(256)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "empty.toml").write_text("")
    write_reward_model(root / "rm" / "checkpoints" / "step_000001")
    return root


def write_reward_model(ckpt):
    """A random reward model laid out as `tessera rm` writes it: body.* + value_head.*, config.json,
    the tokenizer."""
    from safetensors.torch import save_model

    from tessera.alignment.reward import RewardModel
    from tessera.core.config import ModelConfig, to_dict
    from tessera.core.model import Transformer

    ckpt.mkdir(parents=True)
    body = ModelConfig(vocab_size=rl_rewards.TOKENIZER.vocab_size, n_layers=1, d_model=32, n_heads=2, max_seq_len=32)
    save_model(RewardModel(Transformer(body)), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(to_dict(body)))
    rl_rewards.TOKENIZER.save(ckpt)


def tessera(work, command, run, *extra, nproc=1, data="prompts.jsonl"):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "tessera", command, str(work / "empty.toml"), *COMMON,
                           f"--data.path={json.dumps(str(work / data))}",
                           f"--data.tokenizer={json.dumps(str(work / 'tok'))}",
                           f"--train.run_dir={json.dumps(str(work / run))}", *extra],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)})


def train(work, command, run, *extra, nproc=1):
    proc = tessera(work, command, run, *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return read_metrics(work / run)


def generate(work, run):
    """The response `tessera generate` samples from the run's final checkpoint for the prompt 'abc:'."""
    out = subprocess.run([sys.executable, "-m", "tessera", "generate", "--ckpt", str(work / run), "--prompt", "abc:",
                          "--max-new-tokens", "8", "--seed", "0", "--temperature", "0.5"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.startswith("abc:"), out.stderr[-2000:]
    return out.stdout.strip()[len("abc:"):]


def fraction_of_a(text):
    return text.count("a") / max(len(text), 1)


def test_grpo_raises_the_reward_with_a_bounded_kl_and_the_policy_generates(work):
    records = train(work, "grpo", "grpo", "--train.steps=30", "--rl.rollout_batch=8", "--rl.group_size=8",
                    "--rl.mini_batch_size=16", "--rl.epochs=2", "--rl.kl_coef=0.2")
    start, end, kl = summary(records)
    print(f"tessera grpo: reward {start:.3f} -> {end:.3f}, KL {kl:.2f} nats/response")
    assert len(records) == 30 and start < 0.15 and end > start + 0.4
    # a policy that always answers 'a' is ~8 ln(13) = 20 nats from the near-uniform reference
    assert 0 < kl < 12
    assert {"kl_loss", "clipfrac", "entropy", "response_len", "flat_groups", "lr"} <= set(records[-1])
    assert fraction_of_a(generate(work, "grpo")) >= 0.5


def test_ppo_raises_the_reward_with_an_adaptive_kl(work):
    records = train(work, "ppo", "ppo", "--train.steps=30", "--rl.rollout_batch=32", "--rl.mini_batch_size=8",
                    "--rl.epochs=2", "--rl.kl_coef=0.05", "--rl.kl_target=3.0", "--rl.kl_horizon=500")
    start, end, kl = summary(records)
    print(f"tessera ppo: reward {start:.3f} -> {end:.3f}, KL {kl:.2f} nats/response, "
          f"kl_coef {records[-1]['kl_coef']:.3f}")
    assert start < 0.15 and end > start + 0.4 and 0 < kl < 12
    assert records[-1]["kl_coef"] > 0.05  # above target early on, so the controller raised it
    assert all(r["value_loss"] >= 0 and 0 <= r["clipfrac"] <= 1 and r["entropy"] > 0 for r in records)
    assert fraction_of_a(generate(work, "ppo")) >= 0.5


GRPO = ["--rl.rollout_batch=6", "--rl.group_size=4", "--rl.mini_batch_size=12", "--rl.kl_coef=0.2"]
PPO = ["--rl.rollout_batch=16", "--rl.mini_batch_size=8", "--rl.kl_target=3.0", "--rl.kl_horizon=100"]
FSDP2 = ["--parallel.dp_shard=2"]
TP2 = ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.sequence_parallel=false"]
FSDP2_TP2 = ["--parallel.tp=2", "--parallel.dp_shard=2", "--parallel.sequence_parallel=false"]


SLOW = pytest.mark.slow  # ~20-30 s each: the default run keeps GRPO on FSDP2 and PPO with LoRA on TP


@pytest.mark.parametrize("run, command, extra, layout, nproc, losses", [
    pytest.param("grpo", "grpo", GRPO, FSDP2, 2, ("policy_loss", "kl_loss"), id="grpo"),
    pytest.param("ppo", "ppo", PPO, FSDP2, 2, ("policy_loss", "value_loss"), id="ppo", marks=SLOW),
    pytest.param("ppo_lora", "ppo", ["--rl.rollout_batch=16", "--rl.mini_batch_size=8", "--lora.r=4", "--optim.lr=5e-3"],
                 FSDP2, 2, ("policy_loss", "value_loss"), id="ppo_lora", marks=SLOW),
    pytest.param("ppo_tp", "ppo", PPO, TP2, 2, ("policy_loss", "value_loss"), id="ppo_tp", marks=SLOW),
    pytest.param("ppo_lora_tp", "ppo", ["--rl.rollout_batch=16", "--rl.mini_batch_size=8", "--lora.r=4",
                                        "--optim.lr=5e-3"], TP2, 2, ("policy_loss", "value_loss"), id="ppo_lora_tp"),
    pytest.param("grpo_fsdp_tp", "grpo", GRPO, FSDP2_TP2, 4, ("policy_loss", "kl_loss"), id="grpo_fsdp_tp", marks=SLOW),
    pytest.param("ppo_rm", "ppo", [*PPO, "--rl.reward_fn=\"\"", "--rl.reward_model=RM"], FSDP2, 2,
                 ("policy_loss", "value_loss"), id="ppo_rm", marks=SLOW),
])
def test_ranks_match_one_process(work, run, command, extra, layout, nproc, losses):
    """Same prompts per global batch, each sampled from its own seed (rl.seed_per_prompt). FSDP2: the
    rows gathered, so PPO whitens over all of them, and mini-batches drawn from one shared
    permutation (GRPO's of 12 rows cut across its groups of 4), token means over the whole
    mini-batch. TP: the ranks of a TP group decode the same rows in step, each with the KV cache of
    its heads; on FSDP x TP the rows are gathered over the data-parallel peers of each TP index.
    With a reward model (RM), it and the value model started from it are sharded too."""
    extra = [e.replace("RM", json.dumps(str(work / "rm"))) if e.endswith("=RM") else e for e in extra]
    args = (command, "--train.steps=4", "--rl.epochs=2", "--rl.seed_per_prompt=true", *extra)
    one = train(work, args[0], f"{run}1", *args[1:])
    two = train(work, args[0], f"{run}2", *args[1:], *layout, nproc=nproc)
    if run == "ppo_lora":  # only the adapters trained, and they were exported beside the merged policy
        assert (work / "ppo_lora2" / "adapter" / "adapter.safetensors").exists()
        assert (work / "ppo_lora2" / "merged" / "model.safetensors").exists()
        refused = subprocess.run([sys.executable, "-m", "tessera", "generate", "--ckpt", str(work / "ppo_lora2")],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "read through its merged/ export" in refused.stderr
    assert len(one) == len(two) == 4
    worst = 0.0
    for key in ("reward", "kl", "kl_coef" if command == "ppo" else "flat_groups", "entropy", "clipfrac", *losses):
        a, b = [r[key] for r in one], [r[key] for r in two]
        gap = max(abs(x - y) for x, y in zip(a, b)) / max(1.0, *map(abs, a))
        assert gap < 1e-4, (key, a, b)
        worst = max(worst, gap)
    print(f"tessera {run}: {' '.join(layout)} = 1 process within {worst:.1e}, "
          f"{losses[0]} {[r[losses[0]] for r in two]}")
    ckpt = work / f"{run}2" / "checkpoints" / "step_000004"
    assert (ckpt / ".metadata").exists() and (ckpt / "rank1.pt").exists()  # the placement's sharded checkpointer
    generate(work, f"{run}2/merged" if "lora" in run else f"{run}2")


def test_ppo_scored_by_a_reward_model_checkpoint(work, capsys, one_thread):
    """A `tessera rm` checkpoint as the reward and the start of the value model; in this process."""
    from tessera.cli.main import main

    args = ["ppo", str(work / "empty.toml"), *COMMON, f"--data.path={json.dumps(str(work / 'prompts.jsonl'))}",
            f"--data.tokenizer={json.dumps(str(work / 'tok'))}", "--rl.reward_fn=\"\"",
            f"--rl.reward_model={json.dumps(str(work / 'rm'))}", f"--train.run_dir={json.dumps(str(work / 'ppo_rm'))}",
            "--train.steps=2", "--rl.rollout_batch=8", "--rl.mini_batch_size=4"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    records = read_metrics(work / "ppo_rm")
    assert len(records) == 2 and all(abs(r["reward"]) < 10 and r["value_loss"] >= 0 for r in records)
    capsys.readouterr()
    # the value model, started from the reward model's body, resumes from its companion directory
    status = main([*args[:-3], "--train.steps=3", "--rl.rollout_batch=8", "--rl.mini_batch_size=4",
                   "--checkpoint.resume=\"auto\""])
    assert status == 0, capsys.readouterr().err[-2000:]
    assert [r["step"] for r in read_metrics(work / "ppo_rm")] == [1, 2, 3]
    assert (work / "ppo_rm" / "checkpoints" / "step_000003" / "value_model" / "model.safetensors").exists()


@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "two_fsdp_ranks"])
def test_resumed_ppo_replays_the_uninterrupted_run(work, nproc):
    """Steps 3-4 resumed from the step-2 checkpoint (policy, value model, optimizers, KL coefficient,
    prompt stream, sampling and mini-batch generators) equal those of the run that went straight on."""
    args = ["--train.steps=4", "--checkpoint.every=2", "--checkpoint.keep_last=3", "--rl.rollout_batch=8",
            "--rl.mini_batch_size=4", "--rl.epochs=2", "--rl.kl_target=3.0", "--rl.kl_horizon=50",
            *(["--parallel.dp_shard=2"] if nproc == 2 else [])]
    straight = train(work, "ppo", f"resume_straight{nproc}", *args, nproc=nproc)
    ckpt = work / f"resume_straight{nproc}" / "checkpoints" / "step_000002"
    resumed = train(work, "ppo", f"resume_resumed{nproc}", *args, f"--checkpoint.resume={json.dumps(str(ckpt))}",
                    nproc=nproc)
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "entropy"):
        a, b = [r[key] for r in straight[2:]], [r[key] for r in resumed]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5 * max(1.0, *map(abs, a)), (key, a, b)
    assert straight[2]["kl_coef"] != straight[0]["kl_coef"]  # the restored coefficient is not the initial one
    if nproc == 2:  # on one process: models, optimizers and KL coefficient restored, the prompts restart
        proc = tessera(work, "ppo", "resume_one", *args[:-1], f"--checkpoint.resume={json.dumps(str(ckpt))}")
        assert proc.returncode == 0 and "another data-parallel layout" in proc.stderr, proc.stderr[-2000:]
        assert abs(read_metrics(work / "resume_one")[0]["kl_coef"] - straight[2]["kl_coef"]) < 1e-9


def test_ppo_refuses_to_resume_a_checkpoint_without_a_value_model(work, capsys, one_thread):
    """A GRPO checkpoint holds no value model: PPO resuming from it exits 2 naming what is missing."""
    from tessera.cli.main import main

    common = [str(work / "empty.toml"), *COMMON, f"--data.path={json.dumps(str(work / 'prompts.jsonl'))}",
              f"--data.tokenizer={json.dumps(str(work / 'tok'))}", "--train.steps=1", "--rl.rollout_batch=4"]
    assert main(["grpo", *common, "--rl.group_size=2", f"--train.run_dir={json.dumps(str(work / 'no_value'))}"]) == 0
    ckpt = work / "no_value" / "checkpoints" / "step_000001"
    status = main(["ppo", *common, f"--train.run_dir={json.dumps(str(work / 'no_value_ppo'))}",
                   f"--checkpoint.resume={json.dumps(str(ckpt))}"])
    assert status == 2 and "holds no value_model/" in capsys.readouterr().err


def test_sigterm_checkpoints_exits_3_and_auto_resume_finishes(work):
    import signal
    import time

    run = work / "grpo_stop"
    cmd = [sys.executable, "-m", "tessera", "grpo", str(work / "empty.toml"), *COMMON,
           f"--data.path={json.dumps(str(work / 'prompts.jsonl'))}",
           f"--data.tokenizer={json.dumps(str(work / 'tok'))}",
           f"--train.run_dir={json.dumps(str(run))}", "--train.steps=10000", "--rl.rollout_batch=4",
           "--rl.group_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "resume with --resume auto" in err, err[-2000:]
    stopped = read_metrics(run)[-1]["step"]
    assert (run / "checkpoints" / f"step_{stopped:06d}").exists()
    done = subprocess.run([*cmd[:-3], f"--train.steps={stopped + 2}", "--rl.rollout_batch=4", "--rl.group_size=2",
                           "--resume", "auto"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run)][-3:] == [stopped, stopped + 1, stopped + 2]


@pytest.mark.parametrize("extra, message", [
    (TP2[:2], "parallel.sequence_parallel with parallel.tp=2: decoding feeds one token at a time"),
])
def test_layouts_rl_cannot_run_exit_2_naming_the_reason(work, extra, message):
    proc = tessera(work, "grpo", "bad_layout", "--train.steps=1", "--rl.rollout_batch=4", *extra, nproc=2)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("extra, data, message", [
    ([], "bad.jsonl", "bad.jsonl:2: a line must hold a JSON object with a non-empty string 'prompt'"),
    ([], "long.jsonl", "long.jsonl:1: the prompt is 30 tokens"),
    (["--rl.reward_fn=\"\""], "prompts.jsonl", "set exactly one of rl.reward_model"),
    (["--rl.reward_fn=\"no_such_module:f\""], "prompts.jsonl", "cannot import 'no_such_module'"),
    (["--rl.reward_fn=\"rl_rewards:missing\""], "prompts.jsonl", "has no function 'missing'"),
    (["--rl.reward_model=\"/nonexistent\"", "--rl.reward_fn=\"\""], "prompts.jsonl", "rl.reward_model='/nonexistent'"),
    (["--rl.rollout_batch=6", "--rl.mini_batch_size=5"], "prompts.jsonl", "rl.mini_batch_size=5 must split"),
    (["--rl.group_size=1"], "prompts.jsonl", "rl.group_size=1 must be >= 2"),
    (["--rl.max_new_tokens=32"], "prompts.jsonl", "rl.max_new_tokens=32 leaves no room"),
    (["--rl.rollout_batch=512"], "prompts.jsonl", "256 usable prompts, fewer than rl.rollout_batch=512"),
])
def test_bad_input_exits_2_naming_the_problem(work, capsys, extra, data, message):
    """In this process (the checks come before any training), with the command line's exit status."""
    from tessera.cli.main import main

    (work / "bad.jsonl").write_text('{"prompt": "ab:"}\n{"text": "ab:"}\n')
    (work / "long.jsonl").write_text(json.dumps({"prompt": "ab" * 15}) + "\n")
    status = main(["grpo", str(work / "empty.toml"), *COMMON, f"--data.path={json.dumps(str(work / data))}",
                   f"--data.tokenizer={json.dumps(str(work / 'tok'))}",
                   f"--train.run_dir={json.dumps(str(work / 'bad'))}", "--train.steps=1", *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err[-2000:]


@pytest.mark.parametrize("command", ["grpo", "ppo"])
@pytest.mark.parametrize("fn, message", [
    ("nan_for_some", "returned nan"),
    ("raises", "raised KeyError: 'no score for this response'"),
    ("returns_none", "returned None; it must return a number"),
    ("returns_text", "returned '0.5'; it must return a number"),
])
def test_a_reward_that_cannot_train_exits_2_naming_the_function_and_prompt_and_writes_nothing(
        work, capsys, command, fn, message):
    from tessera.cli.main import main

    run = work / f"bad_reward_{command}_{fn}"
    status = main([command, str(work / "empty.toml"), *COMMON, f"--data.path={json.dumps(str(work / 'prompts.jsonl'))}",
                   f"--data.tokenizer={json.dumps(str(work / 'tok'))}", f"--train.run_dir={json.dumps(str(run))}",
                   "--train.steps=2", "--checkpoint.every=1", "--rl.rollout_batch=4", "--rl.group_size=2",
                   f"--rl.reward_fn=\"rl_rewards:{fn}\""])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert f"rl.reward_fn rl_rewards:{fn}" in err[0] and message in err[0] and "(on prompt " in err[0], err[0]
    assert not list((run / "checkpoints").glob("step_*")), "no checkpoint of a run whose reward cannot train"
