"""The checkable RL task of tests/test_ppo.py and tests/test_grpo.py: a tiny char-level policy
from random init learns to answer with the letter 'a' (reward: the fraction of response tokens
that are 'a')."""
import torch

from tessera.core.config import ModelConfig
from tessera.core.model import Transformer
from tessera.core.tokenizer import train_char

LETTERS = "abcdefgh"
TOK = train_char([LETTERS + ":"])
A = TOK.encode("a")[0]


def tiny(seed=0, max_seq_len=32):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, d_model=48, n_heads=4, n_kv_heads=2,
                                   norm="rmsnorm", pos="rope", mlp="swiglu", d_ff=96, max_seq_len=max_seq_len))


def fraction_of_a(prompt, response):
    return sum(t == A for t in response) / len(response)


def prompts(n, rng):
    return [TOK.encode("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5))) + ":") for _ in range(n)]


def summary(history):
    """Reward sampled from the initial policy (before any update), mean reward and mean KL of the
    last 5 steps."""
    start = history[0]["reward"]
    end = sum(h["reward"] for h in history[-5:]) / 5
    kl = sum(h["kl"] for h in history[-5:]) / 5
    return start, end, kl
