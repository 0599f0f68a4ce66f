"""SwiGLU's gating in plain torch: silu(gate) * up, the reference for the Triton kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels.dispatch import register


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


register("swiglu", "torch", swiglu_torch)
