"""The checkable task of tests/test_rl_cli.py, imported by `tessera ppo | grpo` as
`--rl.reward_fn=rl_rewards:fraction_of_a` (tests/ on PYTHONPATH): answer with the letter 'a'."""
from tessera.core.tokenizer import train_char

LETTERS = "abcdefgh"
TOKENIZER = train_char([LETTERS + ":"])  # the test saves this one for the runs: the same ids
A = TOKENIZER.encode("a")[0]


def fraction_of_a(prompt: list[int], response: list[int]) -> float:
    """The fraction of response tokens that are 'a'."""
    return sum(t == A for t in response) / len(response)
