"""Reading and writing whole state dicts as safetensors, one file or shards with an index.

Hugging Face splits large checkpoints into `model-0000k-of-0000n.safetensors` files listed in
`model.safetensors.index.json`; both layouts are read, and written past a maximum shard size.
Nothing here unpickles: safetensors holds only tensors and string metadata.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1024' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"shard size {text!r} is not a size; valid: a number of bytes or e.g. 500MB, 5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of `directory`'s model.safetensors, or of the shards its index lists."""
    directory = Path(directory)
    if (directory / SINGLE).exists():
        return load_file(str(directory / SINGLE))
    if (directory / INDEX).exists():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            tensors.update(load_file(str(directory / name)))
        return tensors
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise ValueError(f"{directory} holds only pickled weights (.bin/.pt), which are never loaded here; "
                         "convert them to safetensors first")
    raise FileNotFoundError(f"{directory} has neither {SINGLE} nor {INDEX}")


def write_state_dict(tensors: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int = 0,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `tensors` as one model.safetensors, or as shards of at most `max_shard_bytes` plus an index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", **(metadata or {})}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(tensors, str(directory / SINGLE), metadata=metadata)
        return [directory / SINGLE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
    return paths
