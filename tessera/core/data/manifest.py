"""The manifest of a prepared data directory: shards, token counts, dtype, tokenizer identity."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataError(RuntimeError):
    """Prepared data that cannot be used: missing, corrupt, or made with another tokenizer."""


@dataclass(frozen=True)
class Shard:
    name: str
    tokens: int
    samples: int


@dataclass(frozen=True)
class Manifest:
    root: Path
    dtype: str
    vocab_size: int
    tokenizer_hash: str
    splits: dict[str, list[Shard]] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    sources: list[str] = field(default_factory=list)  # the input files read, in order
    unknown_tokens: int = 0  # input the tokenizer could only map to its unknown token
    unknown_chars: str = ""  # some of those characters, for the message

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits or not self.splits[split]:
            raise DataError(f"{self.root} has no {split!r} shards; splits: {', '.join(self.splits) or 'none'}")
        return self.splits[split]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=2)


def read_manifest(root: str | Path, tokenizer_hash: str | None = None) -> Manifest:
    """Read `root/manifest.json`; with `tokenizer_hash`, refuse data made by another tokenizer."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise DataError(f"no {MANIFEST} in {root}: run `tessera data prepare --out {root}` first")
    try:
        raw = json.loads(path.read_text())
        splits = {k: [Shard(**s) for s in v] for k, v in raw.pop("splits").items()}
        manifest = Manifest(root=root, splits=splits, **raw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is not a valid manifest: {e}") from None
    if manifest.version != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.version}; this Tessera reads {FORMAT_VERSION}")
    if tokenizer_hash is not None and tokenizer_hash != manifest.tokenizer_hash:
        raise DataError(
            f"{root} was prepared with tokenizer {manifest.tokenizer_hash[:12]}, "
            f"but this run's tokenizer is {tokenizer_hash[:12]}: re-run `tessera data prepare`"
        )
    return manifest
