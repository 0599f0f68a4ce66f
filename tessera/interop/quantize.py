"""`tessera quantize --int8`: dynamic int8 quantization of every linear layer, for CPU inference.

Weights are stored int8 with one fp32 scale per output channel; activations are quantized per
batch at run time (PyTorch's fbgemm/x86 dynamic kernels, `torch.ao.quantization.quantize_dynamic`,
which torch 2.13 still ships while its successor lives in the separate torchao package).
The checkpoint is safetensors only: `model.safetensors` holds the int8 weights as
`<linear>.qweight` + `<linear>.qscale` beside the fp32 embeddings and norms, `quantization.json`
names the method, and loading rebuilds the quantized modules without unpickling anything.
"""
from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tessera.core.checkpoint import find_checkpoint, load_model_from_checkpoint, publish, read_model_config
from tessera.core.config import to_dict
from tessera.core.model import Transformer

METHOD = "dynamic-int8-per-channel"
MANIFEST = "quantization.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@contextmanager
def _quiet():
    """torch warns on every use of the eager quantization API that it is moving to torchao."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        yield


def quantize_model(model: Transformer) -> torch.nn.Module:
    """A copy-free in-place conversion of `model`'s nn.Linear layers to dynamic int8 (fp32 model, CPU)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float().cpu().eval()
    with _quiet():
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _quantized_linears(model: torch.nn.Module):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, DynamicLinear)]


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors only: int8 weights, per-channel scales, biases, and every other parameter."""
    tensors = {}
    linears = _quantized_linears(model)
    for name, module in linears:
        weight, bias = module._weight_bias()
        tensors[f"{name}.qweight"] = weight.int_repr()
        tensors[f"{name}.qscale"] = weight.q_per_channel_scales().float()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    prefixes = tuple(f"{name}." for name, _ in linears)
    for name, p in model.named_parameters():
        if not name.startswith(prefixes):
            tensors[name] = p.detach()
    return {k: v.contiguous() for k, v in tensors.items()}


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
def load_quantized(ckpt: str | Path) -> torch.nn.Module:
    """The int8 model of a checkpoint written by `quantize_int8`, on CPU, in eval mode."""
    ckpt = Path(ckpt)
    method = json.loads((ckpt / MANIFEST).read_text()).get("method") if is_quantized(ckpt) else None
    if method != METHOD:
        raise ValueError(f"{ckpt} is not an int8 checkpoint written by `tessera quantize --int8` (method {method!r})")
    with torch.device("meta"):
        model = Transformer(read_model_config(ckpt))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.zero_()  # placeholders until the stored tensors arrive; quantizing uninitialised memory may warn
    tensors = load_file(str(ckpt / "model.safetensors"))
    model = quantize_model(model)
    linears = _quantized_linears(model)
    for name, module in linears:
        qweight, scale = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.qscale")
        zero = torch.zeros(scale.shape, dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero, 0)
        module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{ckpt}: int8 checkpoint does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, p in params.items():
        p.copy_(tensors[name])
    return model.eval()


def load_for_inference(ckpt: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of any checkpoint for generation: int8 ones (CPU only) or full-precision ones."""
    if not is_quantized(ckpt):
        return load_model_from_checkpoint(ckpt, device)
    if torch.device(device).type != "cpu":
        raise ValueError(f"{ckpt} is an int8 checkpoint, which runs on CPU only: pass --device cpu")
    return load_quantized(ckpt)
