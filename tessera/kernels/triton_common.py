"""Triton helpers shared by the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_cast(x, dtype: tl.constexpr):
    """fp32 `x` cast to `dtype`, rounding to nearest even.

    GPUs round this way already; the Triton interpreter (3.7) truncates fp32 -> bf16, doubling
    the error, so bf16 is rounded by hand first and CPU tests see the GPU's numerics bit for bit.
    NaN passes through unchanged.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
