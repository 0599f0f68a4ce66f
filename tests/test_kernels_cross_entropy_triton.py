"""Triton cross-entropy and fused linear CE (run by the Triton interpreter on CPU) against float64."""
import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():
    torch.set_default_device("cuda")  # on a GPU these run the compiled kernels (benchmarks/gpu_suite.sh)

import torch.nn.functional as F

from tessera.kernels import cross_entropy_torch, cross_entropy_triton, dispatch

ce = cross_entropy_triton.cross_entropy_triton
linear_ce = cross_entropy_triton.linear_cross_entropy_triton


def reference(logits, targets, ignore_index=-100, smoothing=0.0, z=0.0, reduction="mean"):
    """float64 loss written out: lse, log-probabilities, smoothing as the mean of -log p."""
    logits = logits.double().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    lse = torch.logsumexp(logits, -1)
    logp = logits - lse[:, None]
    valid = targets != ignore_index
    nll = -logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    loss = ((1 - smoothing) * nll - smoothing * logp.mean(-1) + z * lse**2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def loss_and_grad(fn, logits, targets, upstream, **kw):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype))
    return loss.double(), grad.double()


def upstream_for(reduction, rows):
    return torch.randn(rows, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)


@pytest.mark.parametrize(
    "vocab, smoothing, z", [(1000, 0.0, 0.0), (1000, 0.1, 0.0), (1000, 0.0, 1e-3), (1000, 0.2, 1e-2),
                            (32000, 0.0, 0.0), (32000, 0.1, 1e-3)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_float64(vocab, smoothing, z, reduction):
    torch.manual_seed(vocab + int(100 * smoothing) + int(1e4 * z))
    logits = torch.randn(16, vocab) * 3
    targets = torch.randint(0, vocab, (16,))
    targets[[2, 9]] = -100
    upstream = upstream_for(reduction, 16)
    kw = dict(label_smoothing=smoothing, z_loss=z, reduction=reduction)
    loss, grad = loss_and_grad(ce, logits, targets, upstream, **kw)
    ref_fn = lambda x, t: reference(x, t, -100, smoothing, z, reduction)  # noqa: E731
    ref, ref_grad = loss_and_grad(ref_fn, logits.double(), targets, upstream)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert (grad[[2, 9]] == 0).all() and (grad[0] != 0).any()


def test_three_dim_logits_custom_ignore_index_and_no_grad():
    torch.manual_seed(5)
    logits = torch.randn(2, 9, 300)
    targets = torch.randint(0, 300, (2, 9))
    targets[0, :3] = 7
    upstream = upstream_for("none", 18)
    loss, grad = loss_and_grad(ce, logits, targets, upstream, ignore_index=7, reduction="none")
    ref, ref_grad = loss_and_grad(lambda x, t: reference(x, t, 7, reduction="none"), logits.double(), targets, upstream)
    assert grad.shape == logits.shape
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert (grad[0, :3] == 0).all()
    plain = ce(logits, targets, ignore_index=7)  # logits not requiring grad: loss only
    torch.testing.assert_close(plain.double(), reference(logits, targets, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_gradient(reduction):
    logits = torch.randn(5, 1000, requires_grad=True)
    loss = ce(logits, torch.full((5,), -100), label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_no_worse_than_torch(dtype):
    """Loss in fp32 from half-precision logits; error within 2x that of the torch kernel.

    grad_output is 1 as in training: another factor would round the stored gradient twice.
    """
    torch.manual_seed(13)
    logits = (torch.randn(16, 1000) * 3).to(dtype)
    targets = torch.randint(0, 1000, (16,))
    targets[4] = -100
    upstream = torch.tensor(1.0, dtype=torch.float64)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    loss, grad = loss_and_grad(ce, logits, targets, upstream, **kw)
    assert ce(logits, targets).dtype == torch.float32
    plain, plain_grad = loss_and_grad(cross_entropy_torch.cross_entropy_torch, logits, targets, upstream, **kw)
    ref, ref_grad = loss_and_grad(lambda x, t: reference(x, t, -100, 0.1, 1e-3), logits.double(), targets, upstream)
    for got, torch_out, want in ((loss, plain, ref), (grad, plain_grad, ref_grad)):
        err, plain_err = (got - want).abs().max(), (torch_out - want).abs().max()
        assert err <= 2 * plain_err + 1e-6 * want.abs().max(), (err, plain_err)


def linear_inputs(dtype, seed, tokens=45, vocab=97, dim=24):
    torch.manual_seed(seed)
    h = torch.randn(tokens, dim).to(dtype).requires_grad_()
    w = (torch.randn(vocab, dim) / dim**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    t[::5] = -100
    return h, w, t


def linear_loss_and_grads(fn, h, w, t):
    loss = fn(h, w, t)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    return loss.double(), gh.double(), gw.double()


@pytest.mark.parametrize("chunk_tokens", [7, 64])
def test_linear_cross_entropy_matches_unfused(monkeypatch, chunk_tokens):
    monkeypatch.setattr(cross_entropy_triton, "CHUNK_LOGITS", chunk_tokens * 97)  # 7: seven chunks
    h, w, t = linear_inputs(torch.float32, chunk_tokens)
    got = linear_loss_and_grads(linear_ce, h, w, t)
    rh, rw = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = linear_loss_and_grads(lambda a, b, c: F.cross_entropy(a @ b.T, c), rh, rw, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_three_dim_and_all_ignored(monkeypatch):
    monkeypatch.setattr(cross_entropy_triton, "CHUNK_LOGITS", 4 * 97)
    h = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(97, 24, requires_grad=True)
    loss, gh, gw = linear_loss_and_grads(linear_ce, h, w, torch.full((3, 5), -100))
    assert loss.item() == 0.0 and gh.shape == h.shape and (gh == 0).all() and (gw == 0).all()


def test_linear_cross_entropy_bfloat16_no_worse_than_torch(monkeypatch):
    monkeypatch.setattr(cross_entropy_triton, "CHUNK_LOGITS", 7 * 97)
    monkeypatch.setattr(cross_entropy_torch, "CHUNK_LOGITS", 7 * 97)
    h, w, t = linear_inputs(torch.bfloat16, 17)
    got = linear_loss_and_grads(linear_ce, h, w, t)
    plain = linear_loss_and_grads(cross_entropy_torch.linear_cross_entropy_torch, h, w, t)
    rh, rw = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = linear_loss_and_grads(lambda a, b, c: F.cross_entropy(a @ b.T, c), rh, rw, t)
    for a, p, e in zip(got, plain, want):
        err, plain_err = (a - e).abs().max(), (p - e).abs().max()
        assert err <= 2 * plain_err + 1e-6 * e.abs().max(), (err, plain_err)


def test_registered_under_triton_backend():
    assert dispatch._registry["cross_entropy"]["triton"] is ce
    assert dispatch._registry["linear_cross_entropy"]["triton"] is linear_ce


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_minus_inf_logit_matches_torch(smoothing):
    """A -inf logit (a banned token) is finite without smoothing (no 0 * -inf) and inf with it, as in torch."""
    torch.manual_seed(21)
    logits = torch.randn(6, 300)
    logits[:, 7] = float("-inf")
    targets = torch.randint(8, 300, (6,))
    upstream = upstream_for("none", 6)
    loss, grad = loss_and_grad(ce, logits, targets, upstream, label_smoothing=smoothing, reduction="none")
    want = F.cross_entropy(logits.double(), targets, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    if smoothing == 0.0:
        ref, ref_grad = loss_and_grad(lambda x, t: reference(x, t, reduction="none"), logits.double(), targets, upstream)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
        assert (grad[:, 7] == 0).all()
