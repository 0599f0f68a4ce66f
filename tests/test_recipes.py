"""Recipes end to end at smoke sizes (`tessera recipe NAME --smoke`): every stage runs, the summary
holds finite numbers, and training moved the validation loss the right way."""
import json
import math

import pytest

from tessera.cli.main import main
from tessera.recipes.runner import recipe_names, run_recipe


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_summary(out, summary):
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["metrics_after"] == summary["metrics_after"]
    assert (out / "summary.md").read_text().startswith(f"# Recipe {summary['recipe']} (smoke)")
    assert (out / "loss.png").stat().st_size > 1000
    for part in ("metrics_before", "metrics_after", "wall_s"):
        assert summary[part] and all(finite(v) for v in summary[part].values()), summary[part]
    assert finite(summary["tokens_per_s"]) and summary["tokens_per_s"] > 0
    assert set(summary["wall_s"]) == {"prepare", "evaluate before", "train", "evaluate after", "sample"}


def test_every_recipe_has_its_config_readme_and_module():
    assert {"shakespeare"} <= set(recipe_names())


def test_shakespeare_smoke(tmp_path, one_thread):
    summary = run_recipe("shakespeare", tmp_path, smoke=True)
    check_summary(tmp_path, summary)
    assert summary["steps"] == 10
    assert summary["metrics_after"]["val_loss"] < summary["metrics_before"]["val_loss"]
    assert summary["samples"]["ROMEO:"].startswith("ROMEO:")


@pytest.mark.parametrize("argv, message", [
    (["recipe", "nope"], "invalid choice: 'nope'"),
    (["recipe", "shakespeare", "--smoke", "--train.stepz=3"], "unknown key train.stepz"),
])
def test_recipe_command_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    try:
        code = main([*argv, "--out", str(tmp_path)])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
