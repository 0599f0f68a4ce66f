"""LayerNorm and RMSNorm, optionally fused with the residual add that precedes them.

With `residual`, the functions return `(norm(x + residual), x + residual)`: the sum is
the new residual stream, and a fused kernel saves one read and one write of it.
"""
from __future__ import annotations

import torch.nn.functional as F

from tessera.kernels.dispatch import register


def layer_norm_torch(x, weight, bias=None, eps: float = 1e-5, residual=None):
    if residual is not None:
        x = x + residual
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps), x
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm_torch(x, weight, eps: float = 1e-6, residual=None):
    if residual is not None:
        x = x + residual
        return F.rms_norm(x, x.shape[-1:], weight, eps), x
    return F.rms_norm(x, x.shape[-1:], weight, eps)


register("layer_norm", "torch", layer_norm_torch)
register("rms_norm", "torch", rms_norm_torch)
