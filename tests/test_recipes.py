"""Recipes end to end at smoke sizes (`tessera recipe NAME --smoke`): every stage runs, the summary
holds finite numbers, and training moved the validation loss the right way."""
import json
import math

import pytest
import torch

from tessera.cli.main import main
from tessera.recipes.code_completion import corpus, is_test_file, split_by_file
from tessera.recipes.code_eval import (TESTED_TASKS, after_head, cut_at_dedent, function_tasks, next_line_matches,
                                       parses, passes)
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
    assert {"shakespeare", "code_completion"} <= set(recipe_names())


def test_shakespeare_smoke(tmp_path, one_thread):
    summary = run_recipe("shakespeare", tmp_path, smoke=True)
    check_summary(tmp_path, summary)
    assert summary["steps"] == 10
    assert summary["metrics_after"]["val_loss"] < summary["metrics_before"]["val_loss"]
    assert summary["samples"]["ROMEO:"].startswith("ROMEO:")


@pytest.fixture(scope="module")
def code_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("code")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, run_recipe("code_completion", out, smoke=True)
    finally:
        torch.set_num_threads(threads)


def test_code_completion_smoke(code_run):
    tmp_path, summary = code_run
    check_summary(tmp_path, summary)
    after = summary["metrics_after"]
    assert after["val_loss"] < summary["metrics_before"]["val_loss"]
    assert after["functions"] >= 1 and after["tested_tasks"] == 2
    assert all(0 <= after[k] <= 1 for k in ("parse_rate", "next_line_exact", "pass_at_1"))
    split = json.loads((tmp_path / "data" / "corpus" / "split.json").read_text())
    assert split["val"] and not any(is_test_file(r) for r in split["val"])
    assert any(label.startswith("tested task fibonacci") for label in summary["samples"])


def test_serve_completes_code_for_an_editor_with_stop_sequences(code_run):
    """`tessera serve` on the recipe's checkpoint: /v1/completions with an editor's stop sequences
    answers the greedy completion computed here, cut before the first stop string."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from serve_server import AUTH, expected_text, start

    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.tokenizer import load_tokenizer

    ckpt = find_checkpoint(code_run[0])
    tok = load_tokenizer(ckpt)
    prompt = "def add(a, b):"
    full = expected_text(ckpt, tok, prompt, 30)
    proc, base = start(ckpt)
    try:
        body = {"prompt": prompt, "max_tokens": 30, "temperature": 0}
        editor = ["\ndef ", "\nclass "]
        out = httpx.post(f"{base}/v1/completions", json={**body, "stop": editor}, headers=AUTH, timeout=60).json()
        cuts = [full.index(s) for s in editor if s in full]
        assert out["choices"][0]["text"] == full[:min(cuts, default=len(full))]
        # a stop string that the completion holds, starting at a newline where it has one, must cut there
        at = full.find("\n") if "\n" in full[:-2] else 1
        stop = full[at:at + 3]
        out = httpx.post(f"{base}/v1/completions", json={**body, "stop": [*editor, stop]}, headers=AUTH, timeout=60).json()
        first = min(full.index(s) for s in [*editor, stop] if s in full)
        assert out["choices"][0]["text"] == full[:first] and out["choices"][0]["finish_reason"] == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("preset, launcher", [("code_gpt2_8gpu", "torchrun --standalone --nproc_per_node 8"),
                                              ("code_gpt2_4node", "#SBATCH --nodes=4")])
def test_code_launch_presets_pass_the_dry_run(capsys, preset, launcher):
    """The GPU presets of the code recipe: accepted by `tessera launch --dry-run` (recipe config and
    overrides loaded, layout checked against nodes x GPUs, the planner's fit check), GPT-2-124M."""
    from tessera.core.config import CONFIG_DIR

    assert main(["launch", str(CONFIG_DIR / "launch" / f"{preset}.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert launcher in out and "tessera train configs/recipes/code_completion/train.toml" in out
    assert "--model.preset=gpt2-124m" in out and "Planner" in (CONFIG_DIR / "launch" / f"{preset}.toml").read_text()


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


# --- code completion: the evaluation on hand-written completions ---------------------------------

SOURCE = '''import os


class Box:
    def area(self, scale=1):
        """The area."""
        w = self.w * scale
        h = self.h * scale
        return w * h


def greet(name):
    text = "hi " + name
    return text


def one_liner():
    return 1
'''


def test_function_tasks_give_the_head_and_the_next_line():
    tasks = {t.name: t for t in function_tasks(SOURCE, "box.py")}
    assert set(tasks) == {"area", "greet"}  # one_liner has nothing after its head
    area = tasks["area"]
    assert area.head == '    def area(self, scale=1):\n        """The area."""\n        w = self.w * scale\n'
    assert area.next_line == "        h = self.h * scale" and area.indent == 4
    assert area.prefix == "import os\n\n\nclass Box:\n" and area.source == "box.py"
    assert tasks["greet"].head == 'def greet(name):\n    text = "hi " + name\n' and tasks["greet"].indent == 0
    assert function_tasks("def broken(:\n    pass\n") == []


def test_parse_and_next_line_on_hand_written_completions():
    area = {t.name: t for t in function_tasks(SOURCE)}["area"]
    right = "        h = self.h * scale\n        return w * h\n\n    def other(self):\n        pass\n"
    assert cut_at_dedent(right, 4) == "        h = self.h * scale\n        return w * h\n"
    assert parses(area, right) and next_line_matches(area, right)
    wrong_but_valid = "        return w\n"
    assert parses(area, wrong_but_valid) and not next_line_matches(area, wrong_but_valid)
    assert not parses(area, "        return (w *\n")  # cut off mid-expression
    assert not parses(area, "        h = = 2\n")
    assert not parses(area, "\n    def other(self):\n        pass\n")  # left at once: adds nothing
    assert not next_line_matches(area, "")
    assert after_head(area.head, "\n        h = 1") == "        h = 1" and after_head(area.head, "x\n    y") == ""


def test_tested_tasks_pass_a_right_body_and_fail_a_wrong_or_endless_one():
    fib = next(t for t in TESTED_TASKS if t.name == "fibonacci")
    right = "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint('junk after')\n"
    assert passes(fib, right)
    assert not passes(fib, "    return n\n")  # fibonacci(10) != 10
    assert not passes(fib, "    while True:\n        pass\n", timeout_s=1.0)
    assert not passes(fib, "    raise SystemExit(0)\n")  # exits 0 before the asserts ran
    assert len(TESTED_TASKS) >= 10 and len({t.name for t in TESTED_TASKS}) == len(TESTED_TASKS)


def test_every_tested_task_has_a_passing_reference_solution():
    """The asserts are satisfiable: a reference body for each task passes (so a 0 is the model's)."""
    bodies = {
        "add": "return a + b", "is_even": "return n % 2 == 0", "maximum": "return max(items)",
        "reverse": "return s[::-1]", "count_vowels": "return sum(c in 'aeiou' for c in text)",
        "square_all": "return [x * x for x in numbers]", "factorial": "return 1 if n == 0 else n * factorial(n - 1)",
        "is_palindrome": "return s == s[::-1]", "clamp": "return max(low, min(value, high))",
        "first_word": "return text.split()[0]", "join_lines": "return '\\n'.join(lines)",
        "get_default": "return mapping.get(key, default)", "unique": "return list(dict.fromkeys(items))",
        "fibonacci": "return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "flatten": "return [x for xs in lists for x in xs]",
        "word_count": "return {w: text.split().count(w) for w in text.split()}",
    }
    assert set(bodies) == {t.name for t in TESTED_TASKS}
    assert all(passes(t, f"    {bodies[t.name]}\n") for t in TESTED_TASKS)


def test_code_corpus_is_deduplicated_and_split_by_file_without_tests_in_val(tmp_path):
    for rel, text in (("a.py", "x = 1\n"), ("b.py", "x = 1\n"), ("pkg/test/c.py", "y = 2\n"), ("pkg/test_d.py", "z\n"),
                      ("site-packages/e.py", "e = 5\n"), ("bad.py", None)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\xff\xfe" if text is None else text.encode())
    files = corpus(tmp_path)
    assert [r for r, _ in files] == ["a.py", "pkg/test/c.py", "pkg/test_d.py"]  # b.py repeats a.py
    assert is_test_file("pkg/test/c.py") and is_test_file("pkg/test_d.py") and is_test_file("x/tests/y.py")
    assert not is_test_file("testing.py") and not is_test_file("unittest/case.py")
    many = [(f"m{i}.py", str(i)) for i in range(400)] + [(f"test/t{i}.py", str(i)) for i in range(400)]
    train, val = split_by_file(many)
    assert sorted(train + val) == sorted(many) and not set(train) & set(val)
    assert val and not any(is_test_file(r) for r, _ in val) and 0.02 < len(val) / 400 < 0.09
