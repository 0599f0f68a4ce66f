from types import SimpleNamespace

import pytest
import torch

from tessera.core.checkpoint import Checkpointer, load_model_from_checkpoint, load_trainer_state
from tessera.core.config import ModelConfig
from tessera.core.model import Transformer


def model():
    return Transformer(ModelConfig(vocab_size=13, n_layers=1, n_heads=2, d_model=8, max_seq_len=8))


def engine(m=None):
    """The two things a checkpointer takes from an engine."""
    m = m or model()
    return SimpleNamespace(model=m, optimizer=torch.optim.AdamW(m.parameters()))


def test_save_load_round_trip_with_tied_weights(tmp_path):
    e = engine()
    m = e.model
    m(torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5))).backward()
    e.optimizer.step()
    ck = Checkpointer(tmp_path, keep_last=3)
    path = ck.save(5, e, {"step": 5, "rng": torch.get_rng_state()})
    again = load_model_from_checkpoint(path)
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert again.lm_head.weight is again.tok_emb.weight
    fresh = engine()
    assert ck.load(path, fresh)["step"] == 5
    assert torch.equal(fresh.model.tok_emb.weight, m.tok_emb.weight)
    saved = e.optimizer.state_dict()["state"][0]["exp_avg_sq"]
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg_sq"], saved) and saved.abs().sum() > 0


def test_keep_last_and_latest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    e = engine()
    for step in (1, 2, 10, 3):
        ck.save(step, e, {"step": step})
    assert [p.name for p in ck.steps()] == ["step_000003", "step_000010"]
    assert ck.latest().name == "step_000010"


def test_crash_mid_write_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=5)
    e = engine()
    m = e.model
    good = ck.save(1, e, {"step": 1})
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        m.tok_emb.weight.add_(1.0)
    with pytest.raises(OSError):
        ck.save(1, e, {"step": 1})  # overwrite attempt of the same step
    with pytest.raises(OSError):
        ck.save(2, e, {"step": 2})
    assert [p.name for p in ck.steps()] == ["step_000001"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_trainer_state_never_unpickles_code(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, engine(), {"step": 1})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "x": Evil()}, path / "trainer_state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_trainer_state(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_model_from_checkpoint(tmp_path)
