"""Triton cross-entropy over a vocabulary, and the LM-head matmul fused with it.

Same signatures and conventions as `cross_entropy_torch`: `mean` averages over tokens whose
target is not `ignore_index`; when every target is ignored, `mean` returns 0.0 (not NaN) and
every gradient is 0, so an empty micro-batch contributes nothing. Ignored rows get zero loss
and zero gradient. `label_smoothing` follows `F.cross_entropy`; `z_loss` adds
z_loss * logsumexp² per valid token. Arithmetic is fp32 whatever the logits' dtype (fp64
logits too); losses are returned in fp32.

One program per row walks the vocabulary twice in the same launch: an online log-sum-exp
(running max and sum, plus the logit sum that label smoothing needs), then the gradient
softmax·(1 + 2·z·lse) − smoothing/V − (1 − smoothing)·onehot. The gradient exists before the
backward because the loss is linear in its grad_output: the backward only rescales it. The
public function writes it into a fresh buffer (the caller's logits stay intact); the fused
linear CE writes it over its own temporary logits, so a chunk costs one tokens x vocab buffer.

Targets must be in [0, vocab) or equal to `ignore_index`; others are clamped, not reported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.dispatch import register
from tessera.kernels.triton_common import round_cast

# Above this many logits, linear_cross_entropy walks the tokens in chunks.
CHUNK_LOGITS = 1 << 24
# Vocabulary elements one program holds at a time; the row is walked in such blocks.
MAX_BLOCK_V = 4096
REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _ce_kernel(
    X, stride_x, G, stride_g, T, LOSS, SCALE, V, ignore_index, smoothing, z_loss,
    BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    target = tl.load(T + row)
    valid = target != ignore_index
    safe_t = tl.minimum(tl.maximum(tl.where(valid, target, 0), 0), V - 1)
    x_target = tl.load(x_row + safe_t).to(tl.float32)

    m = float("-inf")
    s = 0.0
    x_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    # Without smoothing the logit sum must not enter at all: a -inf logit would make it 0 * -inf.
    smooth = tl.where(smoothing != 0.0, smoothing * x_sum / V, 0.0)
    loss = lse - (1.0 - smoothing) * x_target - smooth + z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    if COMPUTE_GRAD:
        scale = tl.where(valid, 1.0, 0.0)
        if HAS_SCALE:
            scale = scale * tl.load(SCALE)
        g_row = G + row * stride_g
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing / V
            g -= tl.where(cols == safe_t, 1.0 - smoothing, 0.0)
            tl.store(g_row + cols, round_cast(g * scale, G.dtype.element_ty), mask=mask)


def _ce_rows(logits, targets, ignore_index, smoothing=0.0, z_loss=0.0, grad=None, scale=None):
    """fp32 per-row losses of 2-D `logits`; fills `grad` (which may be `logits`) when given.

    The gradient is d(row loss)/d(logits), zero on ignored rows, times `scale[0]` if given.
    """
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    _ce_kernel[(rows,)](
        logits, logits.stride(0), grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0, targets, loss,
        scale if scale is not None else loss, vocab, ignore_index, float(smoothing), float(z_loss),
        BLOCK_V=block, COMPUTE_GRAD=grad is not None, HAS_SCALE=scale is not None,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """2-D view of the logits with unit stride along the vocabulary (copies only if needed)."""
    x = logits.reshape(-1, logits.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


class _CrossEntropy(torch.autograd.Function):
    """Loss and gradient in one launch; the backward multiplies the gradient by grad_output.

    For `mean` the kernel already applies 1/num_valid (read from device memory, no host sync),
    so with grad_output 1 (or a power of two) a half-precision gradient is rounded only once.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, smoothing, z_loss, reduction, need_grad):
        x = _as_rows(logits)
        t = targets.reshape(-1).contiguous()
        denom = (t != ignore_index).sum().clamp(min=1)
        scale = (1.0 / denom.to(torch.float32)).reshape(1) if reduction == "mean" else None
        grad = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad else None
        loss = _ce_rows(x, t, ignore_index, smoothing, z_loss, grad=grad, scale=scale)
        ctx.save_for_backward(grad)
        ctx.meta = (logits.shape, reduction)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / denom

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        shape, reduction = ctx.meta
        grad.mul_(grad_out.reshape(-1, 1) if reduction == "none" else grad_out)
        return grad.view(shape), None, None, None, None, None, None


def cross_entropy_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum, none")
    need_grad = torch.is_grad_enabled() and logits.requires_grad  # no gradient pass in evaluation
    return _CrossEntropy.apply(
        logits, targets, int(ignore_index), float(label_smoothing), float(z_loss), reduction, need_grad
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of hidden @ weight.T, chunked over tokens; the Triton kernel turns each chunk's
    logits into their (already 1/num_valid scaled) gradient in place, which two matmuls fold
    into dHidden and dWeight before the next chunk. Only those two gradients are kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, need_h, need_w):
        acc = torch.promote_types(weight.dtype, torch.float32)
        denom = (targets != ignore_index).sum().clamp(min=1)
        inv_denom = (1.0 / denom.to(torch.float32)).reshape(1)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logits = h @ weight.T
            grad = logits if (need_h or need_w) else None
            loss += _ce_rows(logits, targets[start : start + chunk], ignore_index, grad=grad, scale=inv_denom).sum()
            if need_h:
                grad_h[start : start + chunk] = logits @ weight
            if need_w:
                grad_w += (logits.T @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return loss / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_out if grad_h is not None else None
        grad_w = grad_w * grad_out if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy_triton(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` against `targets`; at most CHUNK_LOGITS logits live at once."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).contiguous()
    chunk = max(1, CHUNK_LOGITS // weight.shape[0])
    need_h, need_w = (torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
    return _LinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), chunk, need_h, need_w)


register("cross_entropy", "triton", cross_entropy_triton)
register("linear_cross_entropy", "triton", linear_cross_entropy_triton)
