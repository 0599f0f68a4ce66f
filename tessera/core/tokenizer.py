"""Tokenizers: character-level and byte-level BPE, both built on Hugging Face `tokenizers`.

Both are saved as a standard `tokenizer.json` (plus `tokenizer_config.json`), so that
`transformers.PreTrainedTokenizerFast` and `AutoTokenizer` load them unchanged, and both
carry the special tokens bos, eos and pad. A Hugging Face model's own tokenizer loads too: its
`tokenizer_config.json` names its special tokens (eos standing in for a missing bos or pad).
A tokenizer's identity is the SHA-256 of its serialized form: prepared data records it, and a
run refuses data made by another tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]


class Tokenizer:
    """A thin, typed wrapper around a `tokenizers.Tokenizer` and its special tokens (Tessera's by default)."""

    def __init__(self, backend: HFTokenizer, bos: str = BOS, eos: str = EOS, pad: str = PAD):
        self.backend = backend
        missing = [t for t in (bos, eos, pad) if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.bos, self.eos, self.pad = bos, eos, pad
        self.bos_id = backend.token_to_id(bos)
        self.eos_id = backend.token_to_id(eos)
        self.pad_id = backend.token_to_id(pad)

    @property
    def unk_id(self) -> int | None:
        """The id of the unknown token (char tokenizers have one), None for byte-level ones that need none."""
        token = getattr(self.backend.model, "unk_token", None)
        return self.backend.token_to_id(token) if token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory`; returns the json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self.backend.save(str(path))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad,
            "model_max_length": 1_000_000_000,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a tokenizer.json file or a directory that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    backend = HFTokenizer.from_file(str(path))
    return Tokenizer(backend, **_special_names(path.parent / "tokenizer_config.json", backend))


def _special_names(config: Path, backend: HFTokenizer) -> dict[str, str]:
    """bos/eos/pad as `tokenizer_config.json` names them; none when it names no eos the vocabulary has."""
    if not config.exists():
        return {}
    values = json.loads(config.read_text())

    def name(key: str) -> str | None:
        token = values.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return token if isinstance(token, str) and backend.token_to_id(token) is not None else None

    eos = name("eos_token")
    if eos is None:
        return {}
    return {"eos": eos, "bos": name("bos_token") or eos, "pad": name("pad_token") or eos}


def train_char(texts: Iterable[str]) -> Tokenizer:
    """One token per distinct character of `texts` (sorted), then the special tokens."""
    chars = sorted(set().union(*(set(t) for t in texts)))
    vocab = {c: i for i, c in enumerate(chars)}
    for token in (*SPECIAL_TOKENS, UNK):
        vocab[token] = len(vocab)
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([*SPECIAL_TOKENS, UNK])
    return Tokenizer(backend)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any string round-trips."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
