"""Chain-of-thought templates render exactly, and the answer extractor reads "The answer is X"
off generated text, edge cases included."""
import pytest

from tessera.alignment.cot import Example, cot_prompt, extract_answer, few_shot_prompt, zero_shot_prompt

EXAMPLES = [
    Example("Tom has 3 apples and buys 2 more. How many apples does he have?",
            "Tom starts with 3 apples. He buys 2 more, so 3 + 2 = 5.", "5"),
    Example("A box holds 4 rows of 6 eggs. How many eggs?", "4 rows of 6 eggs is 4 * 6 = 24 eggs.", "24"),
]


def test_zero_shot_prompt_is_rendered_exactly():
    assert zero_shot_prompt("  What is 7 * 8?\n") == "Q: What is 7 * 8?\nA: Let's think step by step."
    assert cot_prompt("What is 7 * 8?") == zero_shot_prompt("What is 7 * 8?")


def test_few_shot_prompt_is_rendered_exactly():
    expected = (
        "Q: Tom has 3 apples and buys 2 more. How many apples does he have?\n"
        "A: Tom starts with 3 apples. He buys 2 more, so 3 + 2 = 5. The answer is 5.\n"
        "\n"
        "Q: A box holds 4 rows of 6 eggs. How many eggs?\n"
        "A: 4 rows of 6 eggs is 4 * 6 = 24 eggs. The answer is 24.\n"
        "\n"
        "Q: What is 7 * 8?\n"
        "A:"
    )
    assert few_shot_prompt("What is 7 * 8?", EXAMPLES) == expected
    assert cot_prompt("What is 7 * 8?", EXAMPLES) == expected


def test_the_extractor_reads_every_worked_example_back():
    for e in EXAMPLES:
        assert extract_answer(e.render()) == e.answer


def test_bad_templates_inputs_are_refused():
    with pytest.raises(ValueError, match="question"):
        zero_shot_prompt("  ")
    with pytest.raises(ValueError, match="non-empty list of Example"):
        few_shot_prompt("q", [])
    with pytest.raises(ValueError, match="non-empty list of Example"):
        few_shot_prompt("q", [("q", "r", "a")])
    with pytest.raises(ValueError, match="Example.reasoning"):
        Example("q", "", "a")
    with pytest.raises(ValueError, match="must not end with a period"):
        Example("q", "r", "5.")


@pytest.mark.parametrize("text, answer", [
    ("The answer is 42.", "42"),
    ("3 + 0.5 = 3.5, so the answer is 3.5.", "3.5"),
    ("The answer is: B", "B"),
    ("THE ANSWER IS **7**.", "7"),
    ('The answer is "yes".', "yes"),
    ("The answer is New York City. It is the largest city.", "New York City"),
    ("The answer is $1,000.", "$1,000"),
    ("The answer is 5. Wait, that is wrong: the answer is 6.", "6"),  # the last one counts
    ("The answer is 12\nQ: What is 2 + 2?\nA:", "12"),
    ("The answer is -3", "-3"),
    ("The answer is 3. Then the answer is .", "3"),  # an empty last statement falls back
    ("The answer isn't obvious.", None),
    ("Let's think step by step. 2 + 2 = 4.", None),
    ("The answer is.", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_wants_text():
    with pytest.raises(TypeError, match="string"):
        extract_answer(None)
