"""Cross-entropy over a vocabulary, and the LM-head matmul fused with it.

Conventions shared by every backend: `mean` averages over tokens whose target is not
`ignore_index`; when every target is ignored, `mean` returns 0 (not NaN) so that an empty
micro-batch contributes nothing to the gradient. `z_loss` adds z_loss * logsumexp² per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels.dispatch import register

# Above this many logits, linear_cross_entropy walks the tokens in chunks.
CHUNK_LOGITS = 1 << 24


def cross_entropy_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.reshape(-1)
    loss = F.cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = targets != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum, none")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients of CE(hidden @ weight.T) without the full tokens x vocab logits.

    Each chunk's logits are computed, turned into their gradient (softmax - onehot) at once,
    and dropped; only dHidden (tokens x d) and dWeight (vocab x d) are kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        valid = targets != ignore_index
        denom = valid.sum().clamp(min=1)
        loss = hidden.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=acc)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            ok = valid[start : start + chunk]
            logits = (h @ weight.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = torch.where(ok, t, torch.zeros_like(t))
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += ((lse - picked) * ok).sum()
            grad = torch.softmax(logits, dim=-1)
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad *= (ok.to(acc) / denom)[:, None]
            grad = grad.to(hidden.dtype)
            grad_h[start : start + chunk] = grad @ weight
            grad_w += (grad.T @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy_torch(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` against `targets`; chunked when the logits are large."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    n, vocab = hidden.shape[0], weight.shape[0]
    if n * vocab <= CHUNK_LOGITS:
        return cross_entropy_torch(hidden @ weight.T, targets, ignore_index)
    chunk = max(1, CHUNK_LOGITS // vocab)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk)


register("cross_entropy", "torch", cross_entropy_torch)
register("linear_cross_entropy", "torch", linear_cross_entropy_torch)
