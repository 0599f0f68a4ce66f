"""Triton rotary position embedding: one kernel for the forward and the backward.

Same signature and result as `rope_torch` (x (B, H, S, D), cos/sin broadcastable to it, the
two halves of each head rotated). Each program owns a block of positions of one (batch, head)
and loads both halves, so the rotation needs no concatenated copy of x. The backward is the
transpose of the rotation, i.e. the rotation by the negative angle, run by the same kernel.
Everything is addressed through strides: the transposed q/k views of the model and the
stride-0 broadcast of the tables are read in place. cos/sin are constant tables (no gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.dispatch import register
from tessera.kernels.triton_common import round_cast


@triton.jit
def _tile(base, b, h, rows, cols, sb, sh, ss, sd):
    return base + b * sb + h * sh + rows * ss + cols * sd


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y, H, S, HALF,
    sxb, sxh, sxs, sxd, scb, sch, scs, scd, ssb, ssh, sss, ssd, syb, syh, sys, syd,
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < S)[:, None] & (cols < HALF)[None, :]
    rows, cols = rows[:, None], cols[None, :]
    x = _tile(X, b, h, rows, cols, sxb, sxh, sxs, sxd)
    c = _tile(COS, b, h, rows, cols, scb, sch, scs, scd)
    s = _tile(SIN, b, h, rows, cols, ssb, ssh, sss, ssd)
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF * scd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF * ssd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation: the halves of sin swap places and change sign
        s1, s2 = -s2, -s1
    y = _tile(Y, b, h, rows, cols, syb, syh, sys, syd)
    tl.store(y, round_cast(x1 * c1 - x2 * s1, Y.dtype.element_ty), mask=mask)
    tl.store(y + HALF * syd, round_cast(x2 * c2 + x1 * s2, Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, heads, seq, dim = x.shape
    y = torch.empty_like(x)  # keeps x's strides, so a transposed view costs no copy
    if x.numel():
        block_d = triton.next_power_of_2(dim // 2)
        block_s = max(1, min(triton.next_power_of_2(seq), 2048 // block_d))
        _rope_kernel[(bsz * heads, triton.cdiv(seq, block_s))](
            x, cos, sin, y, heads, seq, dim // 2,
            *x.stride(), *cos.stride(), *sin.stride(), *y.stride(),
            BACKWARD=backward, BLOCK_S=block_s, BLOCK_D=block_d,
        )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.expand(x.shape), sin.expand(x.shape)  # stride-0 views, no copies
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"Triton rope needs x of shape (B, H, S, D) with an even D, got {tuple(x.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("Triton rope has no gradient for cos/sin; use the torch backend to differentiate them")
    return _Rope.apply(x, cos, sin)


register("rope", "triton", rope_triton)
