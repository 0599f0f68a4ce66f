"""Triton SwiGLU gating: silu(gate) * up in one elementwise pass each way.

Same result as `swiglu_torch` for gate and up of one shape. The forward reads gate and up once
and writes the product, never materialising silu(gate); the backward recomputes the sigmoid
from the saved inputs instead of saving it, and writes both gradients from one read of each
input. Arithmetic is fp32 whatever the storage dtype, with one rounding per output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.dispatch import register
from tessera.kernels.triton_common import round_cast

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, round_cast(g * tl.sigmoid(g) * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    tl.store(DG + offs, round_cast(dy * u * sig * (1.0 + g * (1.0 - sig)), DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, round_cast(dy * g * sig, DU.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, dy, dg, du, n, BLOCK=BLOCK)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"Triton swiglu needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return _SwiGLU.apply(gate, up)


register("swiglu", "triton", swiglu_triton)
