"""`tessera quantize --int8`: int8 weights and per-token int8 activations, for CPU inference.

Weights are stored int8 with one fp32 scale per output channel (symmetric). Activations are
quantized at run time with one scale per token (per row of the input), never per batch: a
row's int8 values, its exact int32 products (`torch._int_mm`) and so its logits do not depend
on which other rows share the batch, which is what the server's batcher promises ("a request
decodes as it would alone"). The checkpoint is safetensors only: `model.safetensors` holds the
int8 weights as `<linear>.qweight` + `<linear>.qscale` beside the fp32 embeddings and norms,
`quantization.json` names the method, and loading rebuilds the model without unpickling anything.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tessera.core.checkpoint import (
    QUANTIZATION_MANIFEST, find_checkpoint, load_model_from_checkpoint, publish, read_model_config,
)
from tessera.core.config import to_dict
from tessera.core.model import Transformer

METHOD = "dynamic-int8-per-channel"  # the stored format; activations are quantized per token at run time
MANIFEST = QUANTIZATION_MANIFEST
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
QMAX = 127  # symmetric int8: -127..127, so that negation never overflows


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized to int8 per row, accumulated exactly in int32."""

    def __init__(self, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("qscale", qscale.float().contiguous())
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / QMAX
        qweight = torch.round(weight / scale[:, None]).clamp(-QMAX, QMAX)
        return cls(qweight, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / QMAX
        q = torch.round(rows / scale).clamp(-QMAX, QMAX).to(torch.int8)
        y = torch._int_mm(q, self.qweight.t()).float() * scale * self.qscale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


class Int8Transformer(Transformer):
    """The Transformer with Int8Linear layers: its head is no plain weight, so the loss is taken from the logits."""

    def forward(self, idx, targets=None, positions=None, doc_ids=None, key_padding_mask=None,
                cache=None, ignore_index: int = -100):
        logits = super().forward(idx, None, positions, doc_ids, key_padding_mask, cache)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every nn.Linear or Int8Linear below `model`."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, (nn.Linear, Int8Linear))]


def quantize_model(model: Transformer) -> Int8Transformer:
    """`model` (any dtype, any device) with every nn.Linear replaced by an Int8Linear, fp32 on CPU, in eval mode."""
    model = model.float().cpu().eval()
    if model.cfg.tie_embeddings:  # the head gets its own int8 copy; the embedding stays fp32
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    for parent, name, child in _linears(model):
        setattr(parent, name, Int8Linear.from_float(child))
    model.__class__ = Int8Transformer
    return model


def quantized_state(model: Int8Transformer) -> dict[str, torch.Tensor]:
    """Plain tensors only: int8 weights, per-channel scales, biases, and every other parameter."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def quantize_int8(ckpt: str | Path, out: str | Path) -> Path:
    """Write the int8 checkpoint of a Tessera checkpoint (or a run's newest) into `out`."""
    ckpt, out = find_checkpoint(ckpt), Path(out)
    model = quantize_model(load_model_from_checkpoint(ckpt))
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(quantized_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt", "quantization": METHOD})
    (tmp / "config.json").write_text(json.dumps(to_dict(model.cfg), indent=2))
    (tmp / MANIFEST).write_text(json.dumps({"method": METHOD, "source": str(ckpt)}, indent=2))
    for name in TOKENIZER_FILES:
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, tmp / name)
    publish(tmp, out)
    return out


def is_quantized(ckpt: str | Path) -> bool:
    return (Path(ckpt) / MANIFEST).exists()


@torch.no_grad()
def load_quantized(ckpt: str | Path) -> Int8Transformer:
    """The int8 model of a checkpoint written by `quantize_int8`, on CPU, in eval mode."""
    ckpt = Path(ckpt)
    method = json.loads((ckpt / MANIFEST).read_text()).get("method") if is_quantized(ckpt) else None
    if method != METHOD:
        raise ValueError(f"{ckpt} is not an int8 checkpoint written by `tessera quantize --int8` (method {method!r})")
    with torch.device("meta"):
        model = Transformer(read_model_config(ckpt))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.zero_()  # placeholders until the stored tensors arrive
    model = quantize_model(model)
    tensors = load_file(str(ckpt / "model.safetensors"))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt}: int8 checkpoint does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [k for k, v in expected.items() if tensors[k].shape != v.shape or tensors[k].dtype != v.dtype]
    if wrong:
        raise ValueError(f"{ckpt}: int8 checkpoint tensor {wrong[0]} is {tensors[wrong[0]].dtype}"
                         f"{list(tensors[wrong[0]].shape)}, its config wants {expected[wrong[0]].dtype}"
                         f"{list(expected[wrong[0]].shape)}")
    model.load_state_dict(tensors)
    return model.eval()


def load_for_inference(ckpt: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of any checkpoint for generation and evaluation: int8 ones (CPU only) or full-precision ones."""
    ckpt = find_checkpoint(ckpt)
    if not is_quantized(ckpt):
        return load_model_from_checkpoint(ckpt, device)
    if torch.device(device).type != "cpu":
        raise ValueError(f"{ckpt} is an int8 checkpoint, which runs on CPU only: pass --device cpu")
    return load_quantized(ckpt)
