"""Rotary position embedding in plain torch: the reference the Triton kernel is tested against."""
from __future__ import annotations

import torch

from tessera.kernels.dispatch import register


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (the Hugging Face Llama convention).

    x is (B, H, S, D); cos/sin broadcast against it, e.g. (B, 1, S, D) from `rope_tables`.
    The math runs in the tables' (fp32) precision and the result is cast back to x's dtype.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


register("rope", "torch", rope_torch)
