"""Import of a Hugging Face CLIP or SigLIP vision tower into `VisionTransformer` (`vision.init_from = "hf:DIR"`).

The directory is what transformers' `save_pretrained` writes for CLIPVisionModel, CLIPModel,
SiglipVisionModel or SiglipModel: `config.json` (the tower's fields; what it leaves out is the
transformers default, restated in `DEFAULTS`) and safetensors weights. CLIP is a class token, a
LayerNorm before the blocks, quick-GELU and a final norm of the pooled token only; SigLIP is no
class token, a patch bias, tanh-GELU, a final norm of every token and attention pooling. The
features then equal transformers' `last_hidden_state` and `pooler_output`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tessera.core.config import ConfigError, VisionConfig
from tessera.multimodal.vision import VisionTransformer

TOWERS = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
DEFAULTS = {  # transformers' CLIPVisionConfig / SiglipVisionConfig defaults
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True),
}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
IMAGE_NORMALISATION = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                       "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def hf_directory(init_from: str) -> Path:
    if not init_from.startswith("hf:"):
        raise ConfigError(f"vision.init_from={init_from!r} must be 'hf:DIR' (a Hugging Face CLIP or SigLIP directory)")
    path = Path(init_from[3:])
    if not (path / "config.json").is_file():
        raise ConfigError(f"vision.init_from={init_from!r}: {path} has no config.json (a Hugging Face model directory)")
    return path


def read_tower(directory: Path) -> tuple[str, dict]:
    """("clip" | "siglip", the vision tower's config fields with transformers' defaults filled in)."""
    config = json.loads((directory / "config.json").read_text())
    kind = TOWERS.get(config.get("model_type", ""))
    if kind is None:
        raise ConfigError(f"{directory}/config.json: model_type={config.get('model_type')!r} is not a vision tower "
                          f"Tessera imports; supported: {', '.join(TOWERS)}")
    tower = config.get("vision_config", {}) if config["model_type"] in ("clip", "siglip") else config
    return kind, {**DEFAULTS[kind], **tower}


def vision_config_from_hf(cfg: VisionConfig) -> VisionConfig:
    """`cfg` with the architecture of the tower `cfg.init_from` names (init_from and dropout kept)."""
    directory = hf_directory(cfg.init_from)
    kind, t = read_tower(directory)
    if t["hidden_act"] not in ACTIVATIONS:
        raise ConfigError(f"{directory}/config.json: hidden_act={t['hidden_act']!r} is not supported; "
                          f"supported: {', '.join(ACTIVATIONS)}")
    if kind == "siglip" and not t["vision_use_head"]:
        raise ConfigError(f"{directory}/config.json: vision_use_head=false is not supported (SigLIP without its "
                          "attention-pooling head has no pooled feature)")
    mean, std = IMAGE_NORMALISATION[kind]
    processor = directory / "preprocessor_config.json"
    if processor.is_file():
        p = json.loads(processor.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    clip = kind == "clip"
    return dataclasses.replace(
        cfg, image_size=t["image_size"], patch_size=t["patch_size"], channels=t["num_channels"],
        n_layers=t["num_hidden_layers"], n_heads=t["num_attention_heads"], d_model=t["hidden_size"],
        d_ff=t["intermediate_size"], norm_eps=float(t["layer_norm_eps"]), activation=ACTIVATIONS[t["hidden_act"]],
        pool="cls" if clip else "map", pre_norm=clip, final_norm="pooled" if clip else "tokens",
        patch_bias=not clip, image_mean=mean, image_std=std,
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of a (possibly sharded) safetensors checkpoint, without the
    `vision_model.` prefix that whole CLIP/SigLIP models (and older transformers) put on them."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{directory} has no model.safetensors (save the model with safe_serialization)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    if any(k.startswith("vision_model.") for k in state):
        return {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    return state


def tessera_state_dict(hf: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Hugging Face vision-tower tensors renamed (and split, for the pooling head) to `VisionTransformer`'s."""
    out = {"patch_emb.weight": hf["embeddings.patch_embedding.weight"],
           "pos_emb": hf["embeddings.position_embedding.weight"],
           "norm.weight": hf["post_layernorm.weight"], "norm.bias": hf["post_layernorm.bias"]}
    if cfg.patch_bias:
        out["patch_emb.bias"] = hf["embeddings.patch_embedding.bias"]
    if cfg.pool == "cls":
        out["cls_token"] = hf["embeddings.class_embedding"]
    if cfg.pre_norm:
        out["pre_norm.weight"], out["pre_norm.bias"] = hf["pre_layrnorm.weight"], hf["pre_layrnorm.bias"]
    names = {"layer_norm1": "attn_norm", "layer_norm2": "mlp_norm", "self_attn.q_proj": "attn.wq",
             "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv", "self_attn.out_proj": "attn.wo",
             "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"}
    for i in range(cfg.n_layers):
        for theirs, ours in names.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{ours}.{p}"] = hf[f"encoder.layers.{i}.{theirs}.{p}"]
    if cfg.pool == "map":
        d = cfg.d_model
        out["head.probe"] = hf["head.probe"].reshape(d)
        for j, name in enumerate(("wq", "wk", "wv")):
            out[f"head.{name}.weight"] = hf["head.attention.in_proj_weight"][j * d:(j + 1) * d]
            out[f"head.{name}.bias"] = hf["head.attention.in_proj_bias"][j * d:(j + 1) * d]
        for theirs, ours in {"attention.out_proj": "wo", "layernorm": "norm", "mlp.fc1": "mlp.up",
                             "mlp.fc2": "mlp.down"}.items():
            for p in ("weight", "bias"):
                out[f"head.{ours}.{p}"] = hf[f"head.{theirs}.{p}"]
    return out


def load_vision_weights(model: VisionTransformer) -> None:
    """Copy the weights of `model.cfg.init_from` into `model` (built from `vision_config_from_hf`)."""
    directory = hf_directory(model.cfg.init_from)
    try:
        state = tessera_state_dict(read_weights(directory), model.cfg)
    except KeyError as e:
        raise ConfigError(f"{directory}: tensor {e.args[0]} is missing; is it a CLIP or SigLIP vision tower?") from None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if state[name].shape != p.shape:
                raise ConfigError(f"{directory}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[name])
