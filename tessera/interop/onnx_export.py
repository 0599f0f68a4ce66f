"""`tessera export onnx`: the model as an ONNX graph from token ids to logits.

Exported through the plain-torch kernels (custom Triton kernels have no ONNX form), in fp32,
with dynamic batch and sequence axes; the sequence may be as long as the model's context.
Models over 1 GiB keep their weights in a `.data` file beside the graph.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from tessera import kernels
from tessera.core.checkpoint import load_model_from_checkpoint
from tessera.core.model import Transformer

EXTERNAL_DATA_BYTES = 1 << 30  # larger weights go beside the graph (protobuf caps a file at 2 GiB)


class LogitsModel(torch.nn.Module):
    """input_ids (B, S) -> logits (B, S, vocab): the one signature the graph exposes."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def export_model(model: Transformer, out: str | Path, opset: int = 18) -> Path:
    """Write `model` (fp32, torch kernels) to `out` with dynamic batch and sequence axes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    example = torch.zeros((2, min(8, model.cfg.max_seq_len)), dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.cfg.max_seq_len)
    large = sum(p.numel() for p in model.parameters()) * 4 > EXTERNAL_DATA_BYTES
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), kernels.use("torch"):
        torch.onnx.export(LogitsModel(model).eval(), (example,), str(out), input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                          opset_version=opset, dynamo=True, external_data=large, verbose=False)
    return out


def export_onnx(ckpt: str | Path, out: str | Path, opset: int = 18) -> Path:
    """Export a Tessera checkpoint (or a run's newest) to `out`."""
    return export_model(load_model_from_checkpoint(ckpt), out, opset)
