"""`tessera convert from-hf | to-hf` and `model.init_from`: Hugging Face checkpoints in and out.

A Tessera checkpoint made from a Hugging Face one is `model.safetensors` + `config.json` (the
ModelConfig) + the tokenizer files and `generation_config.json` + `hf_config.json` (the source
config, so that fields Tessera does not model, such as special token ids, survive the way
back). Tensors keep their dtype and bits both ways; only safetensors are read, so no pickled
code ever runs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tessera.core.checkpoint import (
    find_checkpoint, load_model_from_checkpoint, load_weights, publish, read_model_config, refuse_int8, text_part,
)
from tessera.core.config import ConfigError, ModelConfig, to_dict
from tessera.interop.hf_mapping import (
    ConversionError, config_from_hf, config_to_hf, weights_from_hf, weights_to_hf, with_architecture_of,
)
from tessera.interop.safetensors_io import parse_size, read_state_dict, write_state_dict

CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_CONFIG = "hf_config.json"
DEFAULT_MAX_SHARD = "5GB"


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: no config.json")
    return json.loads(path.read_text())


def _carry_files(src: Path, dst: Path) -> None:
    for name in CARRIED_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def _staging(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def convert_from_hf(src: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face Llama/Mistral/Qwen2/GPT-2 model in `src` as a Tessera checkpoint directory `out`."""
    src, out = Path(src), Path(out)
    hf_cfg = read_hf_config(src)
    arch, cfg = config_from_hf(hf_cfg)
    tensors = weights_from_hf(arch, read_state_dict(src), cfg)
    tmp = _staging(out)
    write_state_dict(tensors, tmp)
    (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    (tmp / HF_CONFIG).write_text(json.dumps(hf_cfg, indent=2))
    _carry_files(src, tmp)
    publish(tmp, out)
    return out


def _special_token_ids(ckpt: Path) -> dict[str, int]:
    """bos/eos/pad ids named by the checkpoint's tokenizer_config.json, looked up in its tokenizer.json."""
    if not (ckpt / "tokenizer.json").exists() or not (ckpt / "tokenizer_config.json").exists():
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    names = json.loads((ckpt / "tokenizer_config.json").read_text())
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = names.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            ids[f"{kind}_token_id"] = tok.token_to_id(token)
    return ids


def read_tessera_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's decoder tensors as stored (dtype kept; an image-conditioned LM's text part);
    sharded (DCP) checkpoints are gathered by the core loader."""
    if (ckpt / "model.safetensors").exists():
        return text_part(load_file(str(ckpt / "model.safetensors")))
    return load_model_from_checkpoint(ckpt).state_dict()


def convert_to_hf(ckpt: str | Path, out: str | Path, max_shard_size: str = DEFAULT_MAX_SHARD) -> Path:
    """Write a Tessera checkpoint (or a run's newest) as a Hugging Face model directory `out`."""
    ckpt, out = find_checkpoint(ckpt), Path(out)
    refuse_int8(ckpt, "tessera convert to-hf")
    cfg = read_model_config(ckpt)
    tensors = weights_to_hf(read_tessera_tensors(ckpt), cfg)
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    hf_cfg = json.loads((ckpt / HF_CONFIG).read_text()) if (ckpt / HF_CONFIG).exists() else {}
    for stale in ("torch_dtype", "rope_scaling", "layer_types"):  # superseded by what config_to_hf writes
        hf_cfg.pop(stale, None)
    hf_cfg.update(config_to_hf(cfg, dtype, prefer=hf_cfg.get("model_type")))
    hf_cfg.update(_special_token_ids(ckpt))
    tmp = _staging(out)
    write_state_dict(tensors, tmp, parse_size(max_shard_size))
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    _carry_files(ckpt, tmp)
    publish(tmp, out)
    return out


def _init_source(init_from: str) -> tuple[str, Path]:
    if init_from.startswith("hf:"):
        path = Path(init_from[3:])
        if not (path / "config.json").exists():
            raise ConfigError(f"model.init_from={init_from!r}: {path} has no config.json (a Hugging Face model directory)")
        return "hf", path
    try:
        return "tessera", find_checkpoint(init_from)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from={init_from!r} is neither 'hf:DIR' nor a Tessera checkpoint") from None


def init_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the architecture of the model `cfg.init_from` names (dropout and init_from kept)."""
    if not cfg.init_from:
        return cfg
    kind, path = _init_source(cfg.init_from)
    source = config_from_hf(read_hf_config(path))[1] if kind == "hf" else read_model_config(path)
    return with_architecture_of(source, cfg)


def init_tokenizer_path(cfg: ModelConfig) -> Path | None:
    """The tokenizer.json shipped with the `init_from` model, if any: the data must be tokenized with it."""
    if not cfg.init_from:
        return None
    path = _init_source(cfg.init_from)[1] / "tokenizer.json"
    return path if path.exists() else None


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, init_from: str) -> None:
    """Copy the weights `init_from` names into `model` (built from `init_model_config`), casting to its dtype."""
    kind, path = _init_source(init_from)
    if kind == "tessera":
        load_weights(model, path)
        return
    hf_cfg = read_hf_config(path)
    arch, cfg = config_from_hf(hf_cfg)
    tensors = weights_from_hf(arch, read_state_dict(path), cfg)
    if cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["tok_emb.weight"]
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ConversionError(f"model.init_from={init_from!r} does not fit the model: {e}") from None


__all__ = ["ConversionError", "convert_from_hf", "convert_to_hf", "init_model_config", "init_tokenizer_path",
           "load_init_weights"]
