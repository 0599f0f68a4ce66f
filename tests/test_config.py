import dataclasses

import pytest

from tessera.core.config import Config, ConfigError, load_config, parse_override, to_toml
from tessera.cli.main import main


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_toml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1\nbetas = [0.9, 0.99]\n[train]\nsteps = 7\n")
    cfg = load_config(path, ["--optim.lr=3e-4", "--train.compile=true", "--model.norm=rmsnorm"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.train.steps == 7 and cfg.train.compile is True
    assert cfg.model.norm == "rmsnorm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["--model.preset=llama-125m", "--train.run_dir=a b\"c", "--optim.betas=[0.8,0.9]"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", "unknown key optim.lrr in [optim]; valid: lr, min_lr"),
    ("--nosuch.x=1", "unknown key nosuch in top level; valid: model, data"),
    ("--train.steps=abc", "train.steps='abc' must be of type int"),
    ("--train.steps=1.5", "train.steps=1.5 must be of type int"),
    ("--train.compile=1", "train.compile=1 must be of type bool"),
    ("--model.norm=batchnorm", "model.norm='batchnorm' is not valid; valid: layernorm, rmsnorm"),
    ("--optim.betas=[0.9]", "optim.betas=[0.9] must be a list of 2 values"),
    ("--model.n_heads=3", "model.d_model=128 must be divisible by model.n_heads=3"),
    ("--model.n_kv_heads=3", "model.n_heads=4 must be divisible by model.n_kv_heads=3"),
    ("--train.seq_len=2048", "train.seq_len=2048 exceeds model.max_seq_len=1024"),
    ("--model.preset=gpt5", "model.preset='gpt5' is not valid; valid: gpt2-1.5b, gpt2-124m"),
    ("--train.steps=0", "train.steps=0 must be positive"),
    ("--model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("--model.d_ff=-8", "model.d_ff=-8 must be >= 0"),
    ("--model.ffn_multiple_of=0", "model.ffn_multiple_of=0 must be > 0"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("--optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
    ("--eval.every=-1", "eval.every=-1 must be >= 0 (0: off)"),
    ("--checkpoint.every=-1", "checkpoint.every=-1 must be >= 0 (0: off)"),
    ("--optim.betas=[1.5, 0.99]", "optim.betas=[1.5, 0.99] must each be in [0, 1)"),
    ("--optim.lr=-0.001", "optim.lr=-0.001 must be >= 0"),
    ("--align.beta=0", "align.beta=0.0 must be > 0"),
    ("--align.beta=-1", "align.beta=-1.0 must be > 0"),
    ("--align.label_smoothing=1.5", "align.label_smoothing=1.5 must be in [0, 0.5)"),
    (("--align.loss='ipo'", "--align.label_smoothing=0.1"), "with 'ipo' set it to 0"),
    ("--rl.epochs=0", "rl.epochs=0 must be >= 1"),
    ("--rl.gamma=1.5", "rl.gamma=1.5 and rl.lam=0.95 must be in [0, 1]"),
    ("--rl.temperature=0", "rl.temperature=0.0 must be > 0"),
])
def test_bad_configs_name_the_key_and_what_is_valid(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override] if isinstance(override, str) else list(override))
    assert message in str(e.value)


def test_preset_supplies_defaults_and_explicit_keys_win():
    cfg = load_config(None, ["--model.preset=gpt2-124m", "--model.n_layers=2"])
    assert (cfg.model.d_model, cfg.model.vocab_size, cfg.model.n_layers, cfg.model.bias) == (768, 50257, 2, True)


def test_override_syntax():
    assert parse_override("--a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("--a.b=hello") == (["a", "b"], "hello")
    with pytest.raises(ConfigError):
        parse_override("--a.b")


def test_cli_config_error_is_one_line_exit_2(tmp_path, capsys):
    path = write(tmp_path, "[model]\nn_heads = 5\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "model.d_model=128 must be divisible by model.n_heads=5" in err
    with pytest.raises(ConfigError):
        main(["train", str(path), "--debug"])


def test_cli_missing_data_and_bad_toml(tmp_path, capsys):
    assert main(["train", str(write(tmp_path, "[data]\npath = 'nowhere'\n"))]) == 2
    assert "data.path='nowhere' does not exist" in capsys.readouterr().err
    assert main(["train", str(write(tmp_path, "[model\n"))]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_defaults_validate():
    assert load_config() == Config()


@pytest.mark.parametrize("content, message", [
    (None, "is a directory; give a TOML file"),
    (b"model = 3\n", "model must be a section ([model] with keys), got 3"),
    (b"[train]\nrun_dir = '\xff\xfe'\n", "is not UTF-8 text"),
])
def test_unreadable_configs_exit_2_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
