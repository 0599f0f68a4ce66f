import json
import math

import pytest
import torch

from tessera.core.build import build_trainer
from tessera.core.config import load_config
from tessera.core.metrics import read_metrics
from tessera.core.trainer import TrainingDiverged


def make_config(prepared, run_dir, *overrides):
    return load_config(None, [
        f"--data.path={json.dumps(str(prepared.root))}", f"--train.run_dir={json.dumps(str(run_dir))}",
        "--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4", "--model.max_seq_len=32",
        "--train.seq_len=32", "--train.batch_size=4", "--train.steps=12", "--optim.warmup_steps=3",
        "--log.every=1", "--eval.every=4", "--eval.batches=2", "--checkpoint.every=0",
        "--log.progress=false", "--log.tensorboard=false", *overrides,
    ])


def make(prepared, run_dir, *overrides):
    return build_trainer(make_config(prepared, run_dir, *overrides))[1]


def losses(run_dir, key="loss"):
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


@pytest.mark.parametrize("extra", [[], ["--data.num_workers=2", "--model.pos=rope", "--model.norm=rmsnorm",
                                        "--model.mlp=swiglu", "--model.n_kv_heads=2", "--train.grad_accum=2"],
                                   ["--model.pos=rope", "--model.norm=rmsnorm", "--model.mlp=swiglu",
                                    "--train.precision=bf16"]])  # what precision="auto" gives on native-bf16 CPUs
def test_stopped_and_resumed_run_matches_uninterrupted_bit_for_bit(prepared, tmp_path, extra):
    full = make(prepared, tmp_path / "full", *extra)
    full.fit()
    part = make(prepared, tmp_path / "part", *extra)
    part.fit(stop_at=5)
    assert part.step == 5 and part.parts.checkpointer.latest().name == "step_000005"
    resumed = make(prepared, tmp_path / "part", "--checkpoint.resume=auto", *extra)
    assert resumed.step == 5
    resumed.fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert losses(tmp_path / "part", "val_loss") == losses(tmp_path / "full", "val_loss")
    for a, b in zip(full.engine.model.parameters(), resumed.engine.model.parameters()):
        assert torch.equal(a, b)


def test_gradient_accumulation_equals_the_large_batch(prepared, tmp_path):
    big = make(prepared, tmp_path / "big", "--train.batch_size=4", "--train.steps=4")
    big.fit()
    acc = make(prepared, tmp_path / "acc", "--train.batch_size=2", "--train.grad_accum=2", "--train.steps=4")
    acc.fit()
    for (s1, a), (s2, b) in zip(losses(tmp_path / "big"), losses(tmp_path / "acc")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)


def test_training_learns_and_logs_every_metric(prepared, tmp_path):
    trainer = make(prepared, tmp_path, "--train.steps=60", "--eval.every=30", "--optim.lr=3e-3",
                   "--log.tensorboard=true", "--log.peak_tflops=1.0", "--checkpoint.every=30")
    final = trainer.fit()
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "skipped_steps"} <= steps[0].keys()
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.7
    assert final["val_loss"] < math.log(prepared.vocab_size) - 0.6
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.toml").exists()
    assert [p.name for p in trainer.parts.checkpointer.steps()] == ["step_000030", "step_000060"]


def test_bf16_autocast_trains(prepared, tmp_path):
    trainer = make(prepared, tmp_path, "--train.precision=bf16", "--train.steps=30", "--optim.lr=3e-3")
    trainer.fit()
    series = [v for _, v in losses(tmp_path)]
    assert all(math.isfinite(v) for v in series) and series[-1] < series[0] - 0.5


def test_non_finite_losses_skip_the_update_then_stop_the_run(prepared, tmp_path):
    trainer = make(prepared, tmp_path, "--checkpoint.every=4", "--train.max_bad_steps=3")
    engine = trainer.engine
    real = engine.forward_backward

    def poisoned(batch, scale=1.0):
        loss = real(batch, scale)
        return loss * float("nan") if trainer.step in (2,) or trainer.step >= 6 else loss

    engine.forward_backward = poisoned
    before = {}

    def snapshot(step):
        if step in (2, 3):
            before[step] = [p.detach().clone() for p in engine.model.parameters()]

    real_step = trainer.train_step

    def watched(batches):
        snapshot(trainer.step)
        return real_step(batches)

    trainer.train_step = watched
    good = None
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row at step 8"):
        trainer.fit()
    # the poisoned step 2 left the weights as they were
    assert all(torch.equal(a, b) for a, b in zip(before[2], before[3]))
    good = trainer.parts.checkpointer.latest()
    assert good.name == "step_000004" and (good / "model.safetensors").exists()
    assert trainer.skipped_steps == 4


@pytest.mark.slow
def test_compiled_model_matches_eager(prepared, tmp_path):
    """Training and evaluation; the compiled run evaluates through its training graph, compiled once."""
    from torch._dynamo.utils import counters

    make(prepared, tmp_path / "eager", "--train.steps=5").fit()
    compiled = make(prepared, tmp_path / "compiled", "--train.steps=5", "--train.compile=true", "--eval.every=2")
    compiled.fit(stop_at=1)
    frames = counters["frames"]["ok"]
    compiled.fit()
    assert counters["frames"]["ok"] == frames  # evaluations at steps 2, 4 and 5 compiled nothing new
    assert compiled.engine.eval_in_training_graph is True
    for (_, a), (_, b) in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled")):
        assert a == pytest.approx(b, rel=1e-4)
    eager_val, compiled_val = losses(tmp_path / "eager", "val_loss"), losses(tmp_path / "compiled", "val_loss")
    assert [s for s, _ in compiled_val] == [2, 4, 5] and eager_val[-1][0] == 5
    assert compiled_val[-1][1] == pytest.approx(eager_val[-1][1], rel=1e-4)


def test_evaluation_through_the_training_graph_equals_eager_evaluation(prepared, tmp_path):
    """What a compiled engine does for evaluation (the training-mode forward with grad on, no backward),
    run eagerly here: the same losses as evaluation mode without grad, no gradient left behind, and only
    for models that compute the same in both modes."""
    from tessera.core.engine import mode_dependent

    trainer = make(prepared, tmp_path, "--train.steps=3")
    trainer.fit()
    engine = trainer.engine
    engine.eval_in_training_graph = False
    eager = trainer.evaluate()
    assert not engine.model.training
    engine.eval_in_training_graph = True
    through_graph = trainer.evaluate()
    assert through_graph["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-6)
    assert engine.model.training and all(p.grad is None for p in engine.model.parameters())
    assert not mode_dependent(engine.model)
    assert mode_dependent(make(prepared, tmp_path / "dropout", "--model.dropout=0.1").engine.model)
    plain = make(prepared, tmp_path / "plain", "--train.steps=2")
    plain.fit()
    assert plain.engine.eval_in_training_graph is False  # not compiled: evaluation mode, no grad


def test_data_from_another_tokenizer_is_refused(prepared, tmp_path):
    from tessera.core.data import DataError
    from tessera.core.tokenizer import train_char

    train_char(["only these letters"]).save(tmp_path / "other")
    with pytest.raises(DataError, match="was prepared with tokenizer"):
        make(prepared, tmp_path / "run", f"--data.tokenizer={json.dumps(str(tmp_path / 'other'))}")


@pytest.mark.parametrize("override, message", [
    ("--parallel.tp=2", "does not fit a world size of 1"),
    ("--parallel.dp_shard=4", "does not fit a world size of 1"),
    ("--parallel.mixed_precision=bf16", "needs parallel.dp_shard > 1"),
])
def test_layouts_one_process_cannot_run_are_refused(prepared, tmp_path, override, message):
    from tessera.core.config import ConfigError
    from tessera.distributed.placement import placement_for

    cfg = make_config(prepared, tmp_path, override)
    with pytest.raises(ConfigError, match=message):
        build_trainer(cfg, placement_for(cfg))


def test_the_plain_placement_refuses_any_layout(prepared, tmp_path):
    from tessera.core.config import ConfigError

    with pytest.raises(ConfigError, match="takes no parallel layout"):
        make(prepared, tmp_path, "--parallel.activation_checkpoint=full")


def test_activation_checkpointing_in_one_process_matches_plain(prepared, tmp_path):
    from tessera.distributed.placement import placement_for

    make(prepared, tmp_path / "plain", "--train.steps=4").fit()
    cfg = make_config(prepared, tmp_path / "ac", "--train.steps=4", "--parallel.activation_checkpoint=full")
    build_trainer(cfg, placement_for(cfg))[1].fit()
    for (_, a), (_, b) in zip(losses(tmp_path / "plain"), losses(tmp_path / "ac")):
        assert a == pytest.approx(b, rel=1e-6)


def test_telemetry_readings_are_logged_with_the_metrics(prepared, tmp_path):
    class Readings:
        calls = 0

        def sample(self):
            self.calls += 1
            return {"gpu0_util": 50.0 + self.calls, "gpu0_mem_gb": 1.5}

    trainer = make(prepared, tmp_path, "--train.steps=4", "--log.every=2")
    trainer.parts.telemetry = Readings()
    trainer.fit()
    assert losses(tmp_path, "gpu0_util") == [(2, 51.0), (4, 52.0)]
