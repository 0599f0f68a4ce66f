"""LoRA: low-rank adapters on chosen linear layers, applied from outside to the plain model.

`LoRALinear` is an `nn.Linear` (same `weight`/`bias` names, so the base model's checkpoint keys
do not change and tensor/FSDP parallelism see a linear layer) with two extra matrices:
y = x W^T + b + (alpha / r) * dropout(x) A^T B^T. B starts at zero, so an adapted model starts
exactly where its base was. Adapters are saved alone, and merged into W for export.

A core mechanism, below every stage that fine-tunes with it: the text stages (tessera.alignment)
adapt the whole decoder, the image-conditioned LM (tessera.multimodal) its `lm` part.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file, save_model

from tessera.core.checkpoint import load_weights, read_model_config, write_run_files
from tessera.core.config import LoraConfig
from tessera.core.model import Transformer

DEFAULT_TARGETS = LoraConfig.targets


class LoRALinear(nn.Linear):
    # which dim of each adapter runs along the layer's input or output features: how tensor
    # parallelism shards them alongside the weight (distributed.parallelize.place_feature_parameters)
    feature_dims = {"lora_a": ("in", 1), "lora_b": ("out", 0)}

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        self.scale = cfg.alpha / cfg.r
        # adapters at least fp32 even on a bf16 base: they are small and their updates tiny
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        self.lora_a = nn.Parameter(torch.empty(cfg.r, base.in_features, device=base.weight.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.r, device=base.weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = cfg.dropout  # functional, not a submodule: TP styles partition every submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = F.dropout(x, self.dropout, self.training) if self.dropout else x
        adapter = (x_in @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
        return super().forward(x) + self.scale * adapter

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _adaptable(model: nn.Module, targets: tuple[str, ...]):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                yield parent, name, child


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap the target linear layers in place and freeze everything but the adapters."""
    if cfg.r < 1:
        raise ValueError(f"lora.r={cfg.r} must be >= 1 to apply adapters")
    if "lm_head" in cfg.targets:
        raise ValueError("lora.targets names lm_head, whose weight the loss reads directly (fused cross-entropy), "
                         f"so its adapter would never train; valid: {list(DEFAULT_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for parent, name, child in _adaptable(model, cfg.targets):
        if not isinstance(child, LoRALinear):
            setattr(parent, name, LoRALinear(child, cfg))
            found += 1
    if not found:
        raise ValueError(f"no linear layer named any of {list(cfg.targets)}; valid: "
                         f"{sorted({n for _, n, _ in _adaptable(model, DEFAULT_TARGETS)})}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (for export): the plain model again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapters(model: nn.Module, cfg: LoraConfig, directory: str | Path) -> Path:
    """`adapter.safetensors` + `adapter_config.json`: the adapters without the base weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(directory / "adapter.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({**cfg.__dict__, "targets": list(cfg.targets)}))
    return directory


def load_adapters(model: nn.Module, directory: str | Path) -> LoraConfig:
    """Apply the saved adapters' config to `model` and load their weights."""
    directory = Path(directory)
    raw = json.loads((directory / "adapter_config.json").read_text())
    cfg = LoraConfig(**{**raw, "targets": tuple(raw["targets"])})
    apply_lora(model, cfg)
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict(load_file(str(directory / "adapter.safetensors"), device=str(device)),
                                                strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise ValueError(f"{directory}: adapters do not fit this model (unexpected {unexpected})")
    return cfg


def export_from_checkpoint(ckpt: str | Path, cfg: LoraConfig, out_dir: str | Path, model: nn.Module | None = None,
                           part: nn.Module | None = None, run_config: str = "") -> tuple[Path, Path]:
    """From a checkpoint of a LoRA run (any layout): `out_dir/adapter` (the adapters alone) and
    `out_dir/merged` (a plain checkpoint with the adapters folded in, for generation and export).
    `model`: the run's model built plain (default: the checkpoint's decoder) whose `part` (default:
    all of it) carried the adapters; `run_config`: the merged checkpoint's run_config.toml."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    model = Transformer(read_model_config(ckpt)) if model is None else model
    part = model if part is None else part
    apply_lora(part, cfg)
    load_weights(model, ckpt)
    adapter = save_adapters(part, cfg, out_dir / "adapter")
    merged = out_dir / "merged"
    merged.mkdir(parents=True, exist_ok=True)
    save_model(merge_lora(model), str(merged / "model.safetensors"))
    write_run_files(merged, model.cfg, run_config, tuple(p for p in ckpt.glob("tokenizer*.json")))
    return adapter, merged
