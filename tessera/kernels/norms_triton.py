"""Triton LayerNorm and RMSNorm, optionally fused with the residual add that precedes them.

Same signatures and semantics as `norms_torch`: with `residual`, the functions return
`(norm(x + residual), x + residual)`. The sum is computed, rounded to the storage dtype and
written by the forward kernel, so the residual stream costs one read of each input and one
write instead of a separate add kernel.

Every row is one program holding the whole feature dim (BLOCK_N = next power of two >= N,
masked), so N is limited to `MAX_FEATURES`. Statistics and arithmetic are fp32 whatever the
storage dtype. The backward computes dX row by row and reduces dW/dB in two stages: each
program owns a block of rows, keeps its partial sums in registers and writes one row of a
(num_blocks, N) fp32 buffer, which torch then sums. No locks, no atomics, deterministic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tessera.kernels.dispatch import register
from tessera.kernels.triton_common import round_cast

# A row lives in registers as fp32: 64 KiB of fp32 per row is where spilling starts to dominate.
MAX_FEATURES = 16384


@triton.jit
def _norm_fwd_kernel(
    X, R, Y, S, W, B, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_s, N, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Normalise the stored (rounded) sum: the backward recomputes from it.
        total = round_cast(x, S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, total, mask=mask)
        x = total.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, round_cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DS, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_x, stride_dy, stride_ds, stride_dx, M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_IN_MEMORY: tl.constexpr,
):
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = block * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)  # the interpreter yields Python ints
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row64)) * rstd, 0.0)
        if ACC_IN_MEMORY:  # reloaded (a cache hit) rather than held in registers across rows
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + tl.sum(wdy, axis=0) / N)) * rstd
        if HAS_DS:
            dx += tl.load(DS + row64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, round_cast(dx, DX.dtype.element_ty), mask=mask)
        if ACC_IN_MEMORY:  # wide rows: registers hold one row, this block's partial sums stay in L2
            dw_row = DW_PART + block * N + cols
            tl.store(dw_row, tl.load(dw_row, mask=mask, other=0.0) + dy * xhat, mask=mask)
            if HAS_BIAS:
                db_row = DB_PART + block * N + cols
                tl.store(db_row, tl.load(db_row, mask=mask, other=0.0) + dy, mask=mask)
        else:
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
    if not ACC_IN_MEMORY:
        tl.store(DW_PART + block * N + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PART + block * N + cols, db, mask=mask)


@functools.lru_cache(maxsize=None)
def _max_row_blocks(device: torch.device) -> int:
    """Enough row blocks to fill the GPU twice over; more only grows the partial-sum buffer."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch_config(n: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_N, num_warps). From 8192 features the backward takes one warp per 1024; above that
    it also keeps the dW and dB partial sums in memory (`acc_in_memory`) rather than registers
    across rows: at 16384 features they spilled 300-600 B per variant on sm_90 with 8 warps and
    170-340 B with 16 (tests/test_kernels_compile.py)."""
    if n > MAX_FEATURES:
        raise ValueError(f"Triton norms support up to {MAX_FEATURES} features, got {n}")
    block = triton.next_power_of_2(n)
    warps = min(max(block // 256, 1), 8)
    return block, max(warps, block // 1024) if backward else warps


def acc_in_memory(block_n: int) -> bool:
    """Whether the backward sums dW and dB in memory: past 8192 features they do not fit in registers."""
    return block_n > 8192


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1, n).contiguous()


class _Norm(torch.autograd.Function):
    """LayerNorm (is_rms=False) or RMSNorm over the last dim, with an optional fused residual add."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms):
        shape, n = x.shape, x.shape[-1]
        block, warps = _launch_config(n)
        x2 = _rows(x, n)
        m = x2.shape[0]
        w = weight.contiguous() if weight is not None else x2.new_ones(n)
        b = bias.contiguous() if bias is not None else w
        stats = dict(device=x.device, dtype=torch.float32)
        mean = torch.empty(m, **stats) if not is_rms else None
        rstd = torch.empty(m, **stats)
        if residual is not None:
            r2 = _rows(residual, n)
            total = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        else:
            r2, total = x2, x2
        y = torch.empty(x2.shape, dtype=total.dtype, device=x.device)
        if m:
            _norm_fwd_kernel[(m,)](
                x2, r2, y, total, w, b, mean if mean is not None else rstd, rstd,
                x2.stride(0), r2.stride(0), y.stride(0), total.stride(0), n, eps,
                IS_RMS=is_rms, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                BLOCK_N=block, num_warps=warps,
            )
        ctx.save_for_backward(total, w, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.meta = (shape, is_rms, weight is not None, bias.dtype if bias is not None else None, x.dtype,
                    residual.dtype if residual is not None else None)
        if residual is None:
            return y.view(shape)
        return y.view(shape), total.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        total, w, mean, rstd = ctx.saved_tensors
        shape, is_rms, has_weight, b_dtype, x_dtype, r_dtype = ctx.meta
        has_bias = b_dtype is not None
        m, n = total.shape
        dw = db = None
        if dy is None:  # only the residual sum was used downstream
            dx = ds
        else:
            block, warps = _launch_config(n, backward=True)
            dy2 = _rows(dy, n)
            ds2 = _rows(ds, n) if ds is not None else dy2
            dx = torch.empty_like(total)
            rows_per_program = triton.cdiv(m, max(1, min(m, _max_row_blocks(total.device))))
            blocks = triton.cdiv(m, rows_per_program) if m else 0
            in_memory = acc_in_memory(block)
            dw_part = (torch.zeros if in_memory else torch.empty)(blocks, n, device=total.device, dtype=torch.float32)
            db_part = (torch.zeros_like if in_memory else torch.empty_like)(dw_part) if has_bias else dw_part
            if m:
                _norm_bwd_kernel[(blocks,)](
                    total, w, dy2, ds2, dx, dw_part, db_part, mean if mean is not None else rstd, rstd,
                    total.stride(0), dy2.stride(0), ds2.stride(0), dx.stride(0), m, n, rows_per_program,
                    IS_RMS=is_rms, HAS_BIAS=has_bias, HAS_DS=ds is not None,
                    BLOCK_N=block, ACC_IN_MEMORY=in_memory, num_warps=warps,
                )
            dw = dw_part.sum(0).to(w.dtype) if has_weight else None
            db = db_part.sum(0).to(b_dtype) if has_bias else None
            dx = dx.view(shape)
        dr = dx.to(r_dtype) if r_dtype is not None else None
        return dx.to(x_dtype), dw, db, dr, None, None


def layer_norm_triton(x, weight, bias=None, eps: float = 1e-5, residual=None):
    return _Norm.apply(x, weight, bias, residual, float(eps), False)


def rms_norm_triton(x, weight, eps: float = 1e-6, residual=None):
    return _Norm.apply(x, weight, None, residual, float(eps), True)


register("layer_norm", "triton", layer_norm_triton)
register("rms_norm", "triton", rms_norm_triton)
