"""The Triton kernels on a real GPU at training shapes, in bf16: the checks the interpreter
cannot make (it misses out-of-bounds accesses and races, and accepts tiles a GPU rejects).
Run by benchmarks/gpu_suite.sh; skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run benchmarks/gpu_suite.sh on one)", allow_module_level=True)

from tessera.kernels import dispatch  # noqa: E402

CUDA = torch.device("cuda")


def triton_op(op):
    return dispatch.implementation(op, "triton")


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def within_ratio(ours, plain, ref, slack=1e-3):
    """The kernel's error against the fp64 reference is at most twice plain torch's in the same dtype."""
    assert max_err(ours, ref) <= 2 * max_err(plain, ref) + slack


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s, d, hq, hkv", [(1024, 128, 8, 2), (1000, 64, 8, 8), (4096, 128, 4, 1), (777, 96, 4, 4)])
def test_attention_bf16(s, d, hq, hkv, causal):
    torch.manual_seed(s + d)
    q = torch.randn(2, hq, s, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, hkv, s, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    rep = hq // hkv
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64.repeat_interleave(rep, 1), v64.repeat_interleave(rep, 1), is_causal=causal)
    plain = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)
    out = triton_op("attention")(q, k, v, causal)
    within_ratio(out, plain, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.bfloat16())
    plain_grads = torch.autograd.grad(plain, (q, k, v), g.bfloat16())
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g)
    for ours, p, r in zip(grads, plain_grads, ref_grads):
        within_ratio(ours, p, r, slack=1e-2)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows, n", [(16384, 4096), (4099, 1000)])
def test_norms_bf16(op, rows, n):
    torch.manual_seed(rows)
    x = torch.randn(rows, n, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=CUDA, dtype=torch.bfloat16)).requires_grad_()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    torch_fn = dispatch.implementation(op, "torch")
    ours, plain, ref = triton_op(op)(x, w), torch_fn(x, w), torch_fn(x64, w64)
    within_ratio(ours, plain, ref)
    g = torch.randn_like(ref)
    for a, p, r in zip(torch.autograd.grad(ours, (x, w), g.bfloat16()), torch.autograd.grad(plain, (x, w), g.bfloat16()),
                       torch.autograd.grad(ref, (x64, w64), g)):
        within_ratio(a, p, r, slack=1e-2 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("tokens, vocab", [(16384, 128256), (1000, 50257)])
def test_cross_entropy_bf16(tokens, vocab):
    torch.manual_seed(vocab)
    logits = (3 * torch.randn(tokens, vocab, device=CUDA)).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=CUDA)
    targets[::7] = -100
    loss = triton_op("cross_entropy")(logits, targets)
    ref = F.cross_entropy(logits.detach().double(), targets)
    assert abs(loss.item() - ref.item()) <= 1e-3 * ref.item()
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[::7] == 0).all()
    ref_grad = torch.softmax(logits.detach().double(), -1)
    ref_grad[torch.arange(tokens, device=CUDA), targets.clamp(min=0)] -= 1
    ref_grad = ref_grad * (targets != -100)[:, None] / (targets != -100).sum()
    assert max_err(grad, ref_grad) <= 2e-2 * ref_grad.abs().max().item()


def test_linear_cross_entropy_bf16_equals_unfused():
    torch.manual_seed(0)
    h = (torch.randn(8192, 2048, device=CUDA) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(32000, 2048, device=CUDA) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, 32000, (8192,), device=CUDA)
    loss = triton_op("linear_cross_entropy")(h, w, t, -100)
    h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
    ref = F.cross_entropy(h32 @ w32.T, t)
    assert abs(loss.item() - ref.item()) <= 2e-3 * ref.item()
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h32, w32))
    for a, r in ((gh, rh), (gw, rw)):
        assert max_err(a, r) <= 2e-2 * r.abs().max().item()
