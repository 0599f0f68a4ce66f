"""The torch kernels (the CPU path and the reference for Triton) against float64 math."""
import math

import pytest
import torch
import torch.nn.functional as F

from tessera import kernels
from tessera.kernels import cross_entropy_torch as ce_module
from tessera.kernels import dispatch
from tessera.kernels.dispatch import KernelBackendError


def naive_attention(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d)) v with an explicit boolean mask (B, 1|H, Sq, Sk)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v.double()


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("hq, hkv, sq, sk", [(4, 4, 37, 37), (6, 2, 23, 23), (4, 1, 5, 29), (2, 2, 1, 17)])
def test_causal_attention_with_gqa_and_decode_offsets(hq, hkv, sq, sk):
    q, k, v = rand(2, hq, sq, 16), rand(2, hkv, sk, 16), rand(2, hkv, sk, 16)
    out = kernels.attention(q, k, v, causal=True)
    qpos = torch.arange(sq)[:, None] + sk - sq
    mask = (torch.arange(sk)[None, :] <= qpos)[None, None]
    ref = naive_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("hq, hkv, sq, sk, window", [(4, 2, 37, 37, 5), (2, 2, 23, 23, 30), (4, 1, 5, 29, 8),
                                                   (2, 2, 1, 17, 3)])
def test_sliding_window_attention(hq, hkv, sq, sk, window):
    q, k, v = rand(2, hq, sq, 16), rand(2, hkv, sk, 16), rand(2, hkv, sk, 16)
    out = kernels.attention(q, k, v, causal=True, window=window)
    qpos = torch.arange(sq)[:, None] + sk - sq
    kpos = torch.arange(sk)[None, :]
    ref = naive_attention(q, k, v, ((kpos <= qpos) & (qpos - kpos < window))[None, None])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    low = kernels.attention(*(t.detach().bfloat16() for t in (q, k, v)), causal=True, window=window)
    torch.testing.assert_close(low.double(), ref.detach(), atol=5e-2, rtol=5e-2)  # the bf16 CPU path masks alike


def test_flash_attn_gets_the_window_in_its_own_convention(monkeypatch):
    """flash-attn's window_size=(left, right) keeps keys j with i - left <= j <= i + right (bottom-right
    aligned), per its documentation; a stand-in with those semantics must give the torch result."""
    from tessera.kernels import attention_flash_attn

    def flash_attn_func(q, k, v, dropout_p, causal, window_size):
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq)[:, None] + sk - sq
        j = torch.arange(sk)[None, :]
        left, right = window_size
        keep = (j <= i) if causal else torch.ones(sq, sk, dtype=torch.bool)
        if left >= 0:
            keep = keep & (j >= i - left) & (j <= i + right)
        return naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep[None, None]).transpose(1, 2)

    monkeypatch.setattr(attention_flash_attn, "flash_attn_func", flash_attn_func)
    q, k, v = rand(1, 4, 9, 8, grad=False), rand(1, 2, 21, 8, grad=False), rand(1, 2, 21, 8, grad=False)
    for window in (0, 1, 4):
        got = attention_flash_attn.attention_flash_attn(q, k, v, causal=True, window=window)
        torch.testing.assert_close(got, kernels.attention(q, k, v, causal=True, window=window))


def test_document_masking_equals_separate_documents():
    lengths = [7, 12, 4]
    s = sum(lengths)
    q, k, v = rand(1, 4, s, 8), rand(1, 2, s, 8), rand(1, 2, s, 8)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    assert torch.equal(kernels.doc_ids_from_cu_seqlens(torch.tensor([0, 7, 19, 23]), s), doc_ids)
    packed = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = kernels.attention(q[:, :, part], k[:, :, part], v[:, :, part], causal=True)
        torch.testing.assert_close(packed[:, :, part], alone)
        start += n


def test_key_padding_mask_hides_pads_and_keeps_rows_finite():
    q, k, v = rand(2, 2, 9, 8, grad=False), rand(2, 2, 9, 8, grad=False), rand(2, 2, 9, 8, grad=False)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :4] = False  # left padding of the second sequence
    out = kernels.attention(q, k, v, causal=True, key_padding_mask=keep)
    assert torch.isfinite(out).all()
    tail = kernels.attention(q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], causal=True)
    torch.testing.assert_close(out[1:, :, 4:], tail)


@pytest.mark.parametrize("shape", [(37, 300), (3, 5, 64)])
def test_norms_and_residual_fusion(shape):
    x, r = rand(*shape), rand(*shape)
    w, b = rand(shape[-1]), rand(shape[-1])
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5), (x - mean) / torch.sqrt(var + 1e-5) * w + b)
    rms = torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), x / rms * w)
    normed, total = kernels.rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, kernels.rms_norm(x + r, w, 1e-6))


def naive_ce(logits, targets, ignore_index=-100, smoothing=0.0, z=0.0):
    logp = logits.double().log_softmax(-1)
    valid = targets != ignore_index
    t = targets.clamp(min=0)
    nll = -logp.gather(-1, t[:, None]).squeeze(-1)
    smooth = -logp.mean(-1)
    loss = (1 - smoothing) * nll + smoothing * smooth + z * torch.logsumexp(logits.double(), -1) ** 2
    return loss * valid, valid


@pytest.mark.parametrize("smoothing, z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_cross_entropy_options_and_reductions(smoothing, z):
    logits = rand(16, 1000)
    targets = torch.randint(0, 1000, (16,))
    targets[[2, 9]] = -100
    per_token, valid = naive_ce(logits, targets, smoothing=smoothing, z=z)
    kw = dict(label_smoothing=smoothing, z_loss=z)
    torch.testing.assert_close(kernels.cross_entropy(logits, targets, reduction="none", **kw).double(), per_token)
    torch.testing.assert_close(kernels.cross_entropy(logits, targets, reduction="sum", **kw).double(), per_token.sum())
    mean = kernels.cross_entropy(logits, targets, **kw)
    torch.testing.assert_close(mean.double(), per_token.sum() / valid.sum())
    mean.backward()
    assert (logits.grad[[2, 9]] == 0).all() and (logits.grad[0] != 0).any()


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
    logits = rand(5, 11)
    loss = kernels.cross_entropy(logits, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_linear_cross_entropy_matches_unfused(monkeypatch, dtype):
    monkeypatch.setattr(ce_module, "CHUNK_LOGITS", 7 * 97)  # force chunks of 7 tokens
    h = torch.randn(45, 24, dtype=dtype, requires_grad=True)
    w = torch.randn(97, 24, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 97, (45,))
    t[::5] = -100
    loss = kernels.linear_cross_entropy(h, w, t)
    ref = F.cross_entropy((h @ w.T).double(), t)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(loss.double(), ref, **tol)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(gh.double(), rh.double(), **tol)
    torch.testing.assert_close(gw.double(), rw.double(), **tol)


def test_dispatch_rejects_unknown_backends_and_ops():
    with pytest.raises(KernelBackendError, match="valid: auto, torch, triton, flash_attn"):
        kernels.configure("cudnn")
    with pytest.raises(KernelBackendError, match="unknown kernel op"):
        kernels.configure("auto", softmax="torch")
    with pytest.raises(KernelBackendError, match="no 'flash_attn' implementation here .pip install flash-attn"):
        kernels.configure("auto", attention="flash_attn")
    with pytest.raises(KernelBackendError, match="no 'flash_attn' implementation"):
        kernels.configure("auto", rms_norm="flash_attn")
    try:
        kernels.configure("torch", attention="auto")
        assert dispatch.current()["attention"] == "auto" and dispatch.current()["rms_norm"] == "torch"
        assert dispatch.resolve("rms_norm", torch.device("cuda")) is dispatch._registry["rms_norm"]["torch"]
    finally:
        kernels.configure("auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu_attention_is_as_accurate_as_torch_sdpa(dtype):
    torch.manual_seed(0)
    q, k, v = rand(2, 6, 33, 16), rand(2, 2, 33, 16), rand(2, 2, 33, 16)
    doc_ids = torch.tensor([[0] * 20 + [1] * 13, [0] * 33])
    mask = kernels.attention_torch.build_mask(33, 33, q.device, True, doc_ids)
    ref = naive_attention(q, k, v, mask)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*low, causal=True, doc_ids=doc_ids)
    assert out.dtype == dtype
    rep = lambda t: t.repeat_interleave(3, 1)  # noqa: E731
    plain = F.scaled_dot_product_attention(low[0], rep(low[1]), rep(low[2]), attn_mask=mask)
    assert (out.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-3
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, low, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=0.05, rtol=0.05)
