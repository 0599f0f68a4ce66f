"""Text in, text out: a Tessera model and tokenizer as a `prompt -> response` function.

The prompting utilities (critique-and-revise, chain of thought) take any such callable, so they
run the same on a Tessera checkpoint, an API client or a deterministic test double. The prompt
is rendered as a user turn with the chat template by default, the way SFT and preference data
render prompts, so a chat-tuned model sees what it was trained on.
"""
from __future__ import annotations

from collections.abc import Callable

from tessera.alignment.sft_data import DEFAULT_CHAT_TEMPLATE, render
from tessera.core.generate import Sampling, generate_tokens
from tessera.core.model import Transformer
from tessera.core.tokenizer import Tokenizer

TextGenerator = Callable[[str], str]


def text_generator(model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 128,
                   sampling: Sampling = Sampling(temperature=0), chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                   seed: int | None = None) -> TextGenerator:
    """A function prompt -> response decoding with the KV cache until eos or `max_new_tokens`.

    `chat_template=None` feeds the prompt text as it is (a base model continuing text). Greedy by
    default, so the same prompt gives the same response.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's {model.cfg.vocab_size}")

    def generate_text(prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a string, not {type(prompt).__name__}")
        text = render(chat_template, [{"role": "user", "content": prompt}], add_generation_prompt=True) \
            if chat_template is not None else prompt
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(ids) >= model.cfg.max_seq_len:
            raise ValueError(f"the prompt is {len(ids)} tokens and leaves no room for a response in the "
                             f"model's max_seq_len={model.cfg.max_seq_len}")
        out = generate_tokens(model, [ids], max_new_tokens, sampling=sampling, stop_ids=(tokenizer.eos_id,),
                              pad_id=tokenizer.pad_id, seed=seed)[0]
        return tokenizer.decode(out[:-1] if out and out[-1] == tokenizer.eos_id else out)

    return generate_text
