"""The checkable task of tests/test_rl_cli.py, imported by `tessera ppo | grpo` as
`--rl.reward_fn=rl_rewards:fraction_of_a` (tests/ on PYTHONPATH): answer with the letter 'a'."""
from tessera.core.tokenizer import train_char

LETTERS = "abcdefgh"
TOKENIZER = train_char([LETTERS + ":"])  # the test saves this one for the runs: the same ids
A = TOKENIZER.encode("a")[0]


def fraction_of_a(prompt: list[int], response: list[int]) -> float:
    """The fraction of response tokens that are 'a'."""
    return sum(t == A for t in response) / len(response)


def nan_for_some(prompt: list[int], response: list[int]) -> float:
    """NaN for prompts of odd length (a reward that cannot train), the fraction of 'a' otherwise."""
    return float("nan") if len(prompt) % 2 else fraction_of_a(prompt, response)


def raises(prompt: list[int], response: list[int]) -> float:
    raise KeyError("no score for this response")


def returns_none(prompt: list[int], response: list[int]) -> None:
    return None


def returns_text(prompt: list[int], response: list[int]) -> str:
    return "0.5"
