"""The Triton flash-attention kernels against float64 math, run on CPU by the Triton interpreter."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if torch.cuda.is_available():
    torch.set_default_device("cuda")  # on a GPU these run the compiled kernels (benchmarks/gpu_suite.sh)

from tessera.kernels import dispatch
from tessera.kernels.attention_torch import attention_torch
from tessera.kernels.attention_triton import attention_triton


def reference(q, k, v, causal=True, doc_ids=None, key_padding_mask=None, window=0):
    """float64 softmax(q k^T / sqrt(d)) v with an explicit mask and K/V repeated per query head."""
    sq, sk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    pos = torch.arange(sq)[:, None] + sk - sq
    key = torch.arange(sk)[None, :]
    keep = (key <= pos) if causal else torch.ones(sq, sk, dtype=torch.bool)
    if window:
        keep = keep & (pos - key < window)
    keep = keep.expand(q.shape[0], 1, sq, sk)
    if doc_ids is not None:
        keep = keep & (doc_ids[:, None, -sq:, None] == doc_ids[:, None, None, :])
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    keep = keep | (key == pos)
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def inputs(b, hq, hkv, sq, sk, d, dtype=torch.float32, seed=0):
    """Fresh random q, k, v and an upstream gradient for the output."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    return q.to(dtype), k.to(dtype), v.to(dtype), torch.randn(b, hq, sq, d)


def forward_backward(fn, q, k, v, grad, **kwargs):
    """(out, dq, dk, dv) of fn on leaf copies of q, k, v."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad.to(out.dtype)))


def assert_matches_reference(q, k, v, grad, atol=1e-4, **kwargs):
    got = forward_backward(attention_triton, q, k, v, grad, **kwargs)
    want = forward_backward(reference, q.double(), k.double(), v.double(), grad, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    return got


def test_registered_as_the_triton_attention():
    assert dispatch._registry["attention"]["triton"] is attention_triton


@pytest.mark.parametrize("hq, hkv, sq, sk, d, causal", [
    (2, 2, 128, 128, 64, True),
    (2, 2, 100, 100, 32, False),
    (4, 2, 100, 100, 64, True),    # grouped-query, ragged last tile
    (4, 1, 37, 37, 32, True),      # multi-query
    (4, 1, 128, 128, 32, False),
    (2, 2, 5, 29, 64, True),       # decoding with a KV cache: bottom-right causal alignment
    (2, 2, 5, 29, 32, False),
    (4, 2, 1, 17, 32, True),       # single-token decode
    (2, 1, 64, 64, 128, True),
    (2, 2, 50, 50, 96, True),      # head dim padded to 128 with masks
])
def test_fp32_matches_float64(hq, hkv, sq, sk, d, causal):
    q, k, v, grad = inputs(1, hq, hkv, sq, sk, d, seed=sq * d + hq)
    assert_matches_reference(q, k, v, grad, causal=causal)


@pytest.mark.parametrize("hq, hkv, sq, sk, d, window", [
    (2, 1, 100, 100, 32, 7),     # window shorter than a tile, ragged last tile
    (2, 2, 77, 77, 32, 45),      # window longer than a GPU fp32 tile (32), not a multiple of it
    (2, 2, 5, 70, 32, 20),       # decoding with a KV cache: the window counts back from each query
    (4, 2, 1, 41, 16, 9),        # single-token decode
    (2, 2, 64, 64, 32, 32),      # window exactly one tile
    (1, 1, 150, 150, 16, 2),     # the band's last query row starts a tile of its own (interpreter tiles: 128 x 64)
    (1, 1, 200, 200, 16, 80),    # window longer than the interpreter's tiles
    (1, 1, 330, 330, 16, 200),   # key tiles wholly inside the window: the unmasked middle stage
])
def test_sliding_window_matches_float64(hq, hkv, sq, sk, d, window):
    q, k, v, grad = inputs(2, hq, hkv, sq, sk, d, seed=sq + window)
    got = assert_matches_reference(q, k, v, grad, window=window)
    torch.testing.assert_close(got[0], attention_torch(q, k, v, window=window), atol=1e-5, rtol=1e-5)


def test_sliding_window_with_documents_and_padding():
    q, k, v, grad = inputs(2, 2, 2, 70, 70, 32, seed=3)
    doc_ids = torch.cat([torch.zeros(2, 30), torch.ones(2, 40)], dim=1).long()
    keep = torch.ones(2, 70, dtype=torch.bool)
    keep[1, :11] = False
    assert_matches_reference(q, k, v, grad, doc_ids=doc_ids, key_padding_mask=keep, window=13)


def test_sliding_window_needs_causal():
    q, k, v, _ = inputs(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="window"):
        attention_triton(q, k, v, causal=False, window=4)


@pytest.mark.parametrize("causal", [True, False])
def test_document_masking_equals_separate_documents(causal):
    lengths = [30, 45, 25]  # document boundaries inside tiles, not on them
    q, k, v, grad = inputs(1, 4, 2, 100, 100, 32, seed=1)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed = assert_matches_reference(q, k, v, grad, causal=causal, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = forward_backward(attention_triton, q[:, :, part], k[:, :, part], v[:, :, part],
                                 grad[:, :, part], causal=causal)
        for a, b in zip(packed, alone):
            torch.testing.assert_close(a[:, :, part], b, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_mask_hides_pads_and_keeps_rows_finite(causal):
    q, k, v, grad = inputs(2, 2, 1, 37, 37, 32, seed=2)
    keep = torch.ones(2, 37, dtype=torch.bool)
    keep[1, :10] = False  # left padding of the second sequence
    keep[0, [3, 20, 36]] = False  # holes in the first
    out = assert_matches_reference(q, k, v, grad, causal=causal, key_padding_mask=keep)[0]
    if causal:  # a left pad sees no real key before it, so only itself
        torch.testing.assert_close(out[1, :, :10], v[1, :, :10].expand(2, -1, -1), atol=1e-6, rtol=1e-6)


def test_decode_with_documents_and_padding():
    q, k, v, grad = inputs(2, 4, 2, 5, 29, 64, seed=3)
    doc_ids = torch.tensor([[0] * 12 + [1] * 17, [0] * 26 + [1] * 3])
    keep = torch.ones(2, 29, dtype=torch.bool)
    keep[0, [13, 20, 21]] = False  # pads inside the queries' document
    assert_matches_reference(q, k, v, grad, causal=True, doc_ids=doc_ids, key_padding_mask=keep)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, s, d, causal", [(4, 2, 100, 64, True), (2, 1, 37, 32, False)])
def test_half_precision_error_within_twice_pytorch_sdpa(dtype, hq, hkv, s, d, causal):
    """Low-precision error is judged against what PyTorch's own attention makes in that dtype."""
    q, k, v, grad = inputs(1, hq, hkv, s, s, d, dtype=dtype, seed=4)
    grad = grad.to(dtype)  # every implementation, the reference included, sees the same values
    rep = hq // hkv

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              is_causal=causal)

    want = forward_backward(reference, q.double(), k.double(), v.double(), grad, causal=causal)
    got = forward_backward(attention_triton, q, k, v, grad, causal=causal)
    base = forward_backward(sdpa, q, k, v, grad, causal=causal)
    for name, a, b, ref in zip(("out", "dq", "dk", "dv"), got, base, want):
        assert a.dtype == dtype, name
        err, base_err = (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-4, f"{name}: error {err:.3g} vs sdpa {base_err:.3g}"


def test_dropout_falls_back_to_torch():
    q, k, v, _ = inputs(1, 2, 2, 16, 16, 32, seed=5)
    torch.manual_seed(6)
    got = attention_triton(q, k, v, causal=True, dropout_p=0.5)
    torch.manual_seed(6)
    torch.testing.assert_close(got, attention_torch(q, k, v, causal=True, dropout_p=0.5))


def test_rejects_heads_that_do_not_group():
    q, k, v, _ = inputs(1, 3, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="multiple"):
        attention_triton(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
def test_one_mask_row_serves_the_batch(causal):
    """doc_ids / key_padding_mask of shape (1, S), as doc_ids_from_cu_seqlens returns, broadcast
    over the batch exactly as in the torch path (and are never read past their end)."""
    q, k, v, grad = inputs(2, 2, 2, 40, 40, 32, seed=7)
    doc_ids = torch.repeat_interleave(torch.arange(2), torch.tensor([15, 25]))[None]
    keep = torch.ones(1, 40, dtype=torch.bool)
    keep[0, [5, 30]] = False
    got = assert_matches_reference(q, k, v, grad, causal=causal, doc_ids=doc_ids, key_padding_mask=keep)[0]
    torch.testing.assert_close(got, attention_torch(q, k, v, causal, doc_ids, keep), atol=1e-5, rtol=1e-5)


def test_mask_of_wrong_batch_is_rejected():
    q, k, v, _ = inputs(3, 2, 2, 16, 16, 32)
    with pytest.raises(ValueError, match=r"shape \(3, 16\) or \(1, 16\)"):
        attention_triton(q, k, v, doc_ids=torch.zeros(2, 16, dtype=torch.long))


@pytest.mark.parametrize("causal", [True, False])
def test_many_documents_skip_tiles_exactly(causal):
    """Documents shorter than a tile, so whole key/query tiles of other documents are skipped;
    labels out of order too, where ranges overlap and nothing may be skipped wrongly."""
    lengths = torch.tensor([70, 90, 20, 60, 60])
    q, k, v, grad = inputs(1, 2, 1, 300, 300, 16, seed=8)
    in_order = torch.repeat_interleave(torch.arange(5), lengths)[None]
    shuffled = torch.repeat_interleave(torch.tensor([3, 0, 4, 3, 1]), lengths)[None]  # label 3 twice: one document
    for doc_ids in (in_order, shuffled):
        assert_matches_reference(q, k, v, grad, causal=causal, doc_ids=doc_ids)
