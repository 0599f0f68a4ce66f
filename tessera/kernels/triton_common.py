"""Triton helpers shared by the kernels."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Read when triton.jit decides between compiling and interpreting (tests/conftest.py sets it first).
INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_cast(x, dtype: tl.constexpr):
    """fp32 `x` cast to `dtype`, rounding to nearest even.

    GPUs round this way in one instruction; the Triton interpreter (3.7) truncates fp32 -> bf16,
    doubling the error, so under the interpreter bf16 is rounded by hand first and CPU tests see
    the GPU's numerics bit for bit. Compiled code keeps the single conversion. NaN passes through.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation. The interpreter (3.7) multiplies bf16 tiles as their
    raw uint16 bits, so under it the tiles are widened to fp32 first (exact for 16-bit values)."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
