"""Progressive sequence length (`train.seq_len_schedule`): validated, fed by the loader at each
phase's length without re-reading the epoch, resumed exactly across a phase boundary, counted
correctly in tokens/s, sized at its longest length and never compiled by "auto"."""
import json

import numpy as np
import pytest
import torch

from tessera.core import speed
from tessera.core.config import ConfigError, load_config
from tessera.core.data import StreamingLoader
from tessera.core.metrics import read_metrics
from tests.test_trainer import losses, make


def schedule_cfg(schedule, *extra):
    return load_config(None, [f"--train.seq_len_schedule={json.dumps(schedule)}", *extra])


def test_the_length_of_each_step_follows_the_schedule():
    t = schedule_cfg([[0, 16], [5, 48], [9, 32]], "--train.seq_len=48").train
    assert [t.seq_len_at(s) for s in range(12)] == [16] * 5 + [48] * 4 + [32] * 3
    assert t.seq_lens == (16, 48, 32)
    assert load_config(None, ["--train.seq_len=24"]).train.seq_len_at(7) == 24


@pytest.mark.parametrize("schedule, extra, message", [
    ([[1, 16]], [], "must start at 0 and increase"),
    ([[0, 16], [8, 32], [8, 48]], ["--train.seq_len=48"], "must start at 0 and increase"),
    ([[0, 16], [4, 2048]], ["--train.seq_len=2048"], "model.max_seq_len=1024"),
    ([[0, 0], [4, 32]], ["--train.seq_len=32"], "length 0 is not valid"),
    ([[0, 16], [4, 32]], [], "train.seq_len=64 must equal the longest length"),
    ([[0, 16, 3]], [], "must be a list of 2 values"),
])
def test_impossible_schedules_are_refused_naming_what_is_valid(schedule, extra, message):
    with pytest.raises(ConfigError, match=message):
        schedule_cfg(schedule, *extra)


def stream_tokens(loader: StreamingLoader) -> np.ndarray:
    shards = loader.assignment(0)[0]
    return np.concatenate(list(loader.reader.tokens(shards)))


@pytest.mark.parametrize("switch_at, old, new", [(3, 16, 40), (5, 40, 16), (0, 16, 24)])
def test_a_new_length_goes_on_from_where_the_epoch_was_read(prepared, switch_at, old, new):
    loader = StreamingLoader(prepared, "train", 3, old, shuffle=False)
    stream = stream_tokens(loader)
    batches = iter(loader)
    for i in range(switch_at):
        x, _ = next(batches)
        assert torch.equal(x[0], torch.from_numpy(stream[i * 3 * (old + 1):][:old].astype(np.int64)))
    batches.close()
    loader.set_seq_len(new)
    read = switch_at * 3 * (old + 1)
    first = loader.batch * 3 * (new + 1)  # the first token the new length reads
    assert read <= first < read + 3 * (new + 1)  # nothing read twice, less than a batch left out
    x, y = next(iter(loader))
    assert x.shape == y.shape == (3, new)
    window = torch.from_numpy(stream[first:first + 3 * (new + 1)].astype(np.int64)).view(3, new + 1)
    assert torch.equal(x, window[:, :-1]) and torch.equal(y, window[:, 1:])
    assert loader.state_dict()["seq_len"] == new


def test_the_loader_state_carries_the_length(prepared):
    loader = StreamingLoader(prepared, "train", 2, 16, seed=3)
    batches = iter(loader)
    next(batches)
    loader.set_seq_len(32)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    expected = next(batches)
    again = StreamingLoader(prepared, "train", 2, 32, seed=3)  # built at the longest length, as the task does
    again.load_state_dict(state)
    assert again.seq_len == 32 and all(torch.equal(a, b) for a, b in zip(next(iter(again)), expected))


SCHEDULE = '--train.seq_len_schedule=[[0, 8], [4, 16], [7, 32]]'


# stopped in the first phase or the second, so the resumed run crosses 2 or 1 boundaries; learned
# positions (rows 0..L-1 of the table) and RoPE (the first L positions of its tables)
@pytest.mark.parametrize("stop, pos", [(3, "learned"), (5, "rope")])
def test_resumed_run_crosses_phase_boundaries_exactly_as_an_uninterrupted_one(prepared, tmp_path, stop, pos):
    run = (SCHEDULE, "--train.steps=9", f"--model.pos={pos}")
    full = make(prepared, tmp_path / "full", *run)
    full.fit()
    part = make(prepared, tmp_path / "part", *run)
    part.fit(stop_at=stop)
    resumed = make(prepared, tmp_path / "part", *run, "--checkpoint.resume=auto")
    assert resumed.step == stop
    resumed.fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert losses(tmp_path / "part", "val_loss") == losses(tmp_path / "full", "val_loss")
    lengths = [r["seq_len"] for r in read_metrics(tmp_path / "full") if "seq_len" in r]
    assert lengths == [8] * 4 + [16] * 3 + [32] * 2
    for a, b in zip(full.engine.model.parameters(), resumed.engine.model.parameters()):
        assert torch.equal(a, b)


def test_tokens_per_step_follow_the_phase(prepared, tmp_path):
    trainer = make(prepared, tmp_path, SCHEDULE, "--train.grad_accum=2")
    assert [trainer.tokens_in_step(s) for s in (0, 3, 4, 7, 11)] == [4 * 2 * n for n in (8, 8, 16, 32, 32)]


def test_auto_compile_leaves_a_schedule_eager_and_says_why():
    cfg = schedule_cfg([[0, 16], [4, 32]], "--train.seq_len=32", "--train.compile=\"auto\"", "--train.steps=5000")
    out, line = speed.resolve(cfg, torch.device("cpu"), 1, True, flags=lambda: frozenset())
    assert out.train.compile is False and "seq_len_schedule changes the shapes" in line
    one_phase = schedule_cfg([[0, 32]], "--train.seq_len=32", "--train.compile=\"auto\"", "--train.steps=5000")
    assert speed.resolve(one_phase, torch.device("cpu"), 1, True, flags=lambda: frozenset())[0].train.compile is True


def test_plan_sizes_a_schedule_at_its_longest_length(capsys):
    from tessera.cli.main import main

    fixed = ["plan", "--model", "llama-8b", "--gpus", "8"]
    assert main([*fixed, "--seq", "8192"]) == 0
    at_longest = capsys.readouterr().out
    assert main([*fixed, "--seq-len-schedule", "[[0, 1024], [1000, 8192], [2000, 4096]]"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("memory sized for its longest length, 8192 (step times below are those of "
                                        "that phase)")
    assert out.split("\n", 1)[1] == at_longest
    assert main([*fixed, "--seq-len-schedule", "[[5, 1024]]"]) == 2
    assert "must start at 0" in capsys.readouterr().err
    assert main([*fixed, "--seq", "1024", "--seq-len-schedule", "[[0, 1024], [9, 2048]]"]) == 2
    assert main(fixed) == 2
