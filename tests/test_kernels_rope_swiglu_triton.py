"""Triton RoPE and SwiGLU (run by the Triton interpreter on CPU) and their torch references
against float64 math written out here."""
import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():
    torch.set_default_device("cuda")  # on a GPU these run the compiled kernels (benchmarks/gpu_suite.sh)


from tessera import kernels  # noqa: E402
from tessera.core.config import ModelConfig  # noqa: E402
from tessera.core.rope_scaling import rope_tables  # noqa: E402
from tessera.kernels import dispatch, rope_torch, rope_triton, swiglu_torch, swiglu_triton  # noqa: E402

ROPE = {"triton": rope_triton.rope_triton, "torch": rope_torch.rope_torch}
SWIGLU = {"triton": swiglu_triton.swiglu_triton, "torch": swiglu_torch.swiglu_torch}


def rope_reference(x, cos, sin):
    """float64 RoPE pair by pair: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos[..., :h] - x2 * sin[..., :h], x2 * cos[..., h:] + x1 * sin[..., h:]], dim=-1)


def swiglu_reference(gate, up):
    return gate / (1 + torch.exp(-gate)) * up


def rope_inputs(shape, dtype, transposed, **scaling):
    """x (B, H, S, D), as the model's transposed q/k view or contiguous; fp32 tables (B, 1, S, D)
    of the RoPE that the ModelConfig knobs `scaling` describe."""
    b, h, s, d = shape
    x = torch.randn(b, s, h, d).transpose(1, 2) if transposed else torch.randn(b, h, s, d)
    x = x.to(dtype).requires_grad_()
    positions = torch.arange(s).expand(b, s) + torch.arange(b)[:, None] * 5  # rows start at different positions
    cos, sin = rope_tables(ModelConfig(n_heads=1, d_model=d, pos="rope", **scaling), positions)
    return x, cos, sin


def rope_outputs_and_grads(fn, x, cos, sin, upstream):
    y = fn(x, cos, sin)
    assert y.dtype == x.dtype and y.shape == x.shape
    (dx,) = torch.autograd.grad((y.double() * upstream).sum(), x)
    return y.double(), dx.double()


def swiglu_outputs_and_grads(fn, gate, up, upstream):
    y = fn(gate, up)
    assert y.dtype == gate.dtype and y.shape == gate.shape
    return [y.double()] + [g.double() for g in torch.autograd.grad((y.double() * upstream).sum(), (gate, up))]


def double_leaf(t):
    return t.detach().double().requires_grad_()


def swiglu_inputs(shape, dtype):
    gate = torch.randn(shape) * 4  # wide enough to reach both saturated ends of the sigmoid
    return gate.to(dtype).requires_grad_(), torch.randn(shape).to(dtype).requires_grad_()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 32), (2, 3, 37, 64), (1, 2, 1, 48)])
@pytest.mark.parametrize("transposed", [False, True])
def test_rope_matches_float64(impl, shape, transposed):
    torch.manual_seed(shape[-1] + transposed)
    x, cos, sin = rope_inputs(shape, torch.float32, transposed)
    upstream = torch.randn(shape, dtype=torch.float64)
    got = rope_outputs_and_grads(ROPE[impl], x, cos, sin, upstream)
    want = rope_outputs_and_grads(rope_reference, double_leaf(x), cos.double(), sin.double(), upstream)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rope_scaled_tables_match_float64(impl):
    """YaRN tables: stretched frequencies and cos/sin scaled by the attention factor (not unit norm)."""
    torch.manual_seed(11)
    x, cos, sin = rope_inputs((2, 3, 37, 32), torch.float32, True, rope_scaling="yarn", rope_factor=4.0,
                              rope_original_max_seq_len=16)
    assert cos[0, 0, 0, 0].item() > 1.1  # the attention factor 0.1 ln 4 + 1 is in the tables
    upstream = torch.randn(x.shape, dtype=torch.float64)
    got = rope_outputs_and_grads(ROPE[impl], x, cos, sin, upstream)
    want = rope_outputs_and_grads(rope_reference, double_leaf(x), cos.double(), sin.double(), upstream)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_rope_arbitrary_tables_broadcast_over_batch():
    """Tables whose halves differ, shared by the batch (1, 1, S, D): the kernel reads every entry."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 37, 32, requires_grad=True)
    cos, sin = torch.randn(1, 1, 37, 32), torch.randn(1, 1, 37, 32)
    upstream = torch.randn(x.shape, dtype=torch.float64)
    got = rope_outputs_and_grads(ROPE["triton"], x, cos, sin, upstream)
    want = rope_outputs_and_grads(rope_reference, double_leaf(x), cos.double(), sin.double(), upstream)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(37, 300), (3, 5, 70)])
def test_swiglu_matches_float64(impl, shape):
    torch.manual_seed(shape[0])
    gate, up = swiglu_inputs(shape, torch.float32)
    upstream = torch.randn(shape, dtype=torch.float64)
    got = swiglu_outputs_and_grads(SWIGLU[impl], gate, up, upstream)
    want = swiglu_outputs_and_grads(swiglu_reference, double_leaf(gate), double_leaf(up), upstream)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def assert_no_worse_than_torch(got, plain, want):
    """Half precision: within 2x the error of the torch kernel in the same dtype."""
    for a, p, e in zip(got, plain, want):
        err, plain_err = (a - e).abs().max(), (p - e).abs().max()
        assert err <= 2 * plain_err + 1e-6 * e.abs().max(), (err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_low_precision_error_no_worse_than_torch(dtype):
    torch.manual_seed(11)
    x, cos, sin = rope_inputs((2, 3, 37, 64), dtype, transposed=True)
    upstream = torch.randn(x.shape, dtype=torch.float64)
    got = rope_outputs_and_grads(ROPE["triton"], x, cos, sin, upstream)
    plain = rope_outputs_and_grads(ROPE["torch"], x, cos, sin, upstream)
    want = rope_outputs_and_grads(rope_reference, double_leaf(x), cos.double(), sin.double(), upstream)
    assert_no_worse_than_torch(got, plain, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_low_precision_error_no_worse_than_torch(dtype):
    torch.manual_seed(12)
    gate, up = swiglu_inputs((37, 300), dtype)
    upstream = torch.randn(37, 300, dtype=torch.float64)
    got = swiglu_outputs_and_grads(SWIGLU["triton"], gate, up, upstream)
    plain = swiglu_outputs_and_grads(SWIGLU["torch"], gate, up, upstream)
    want = swiglu_outputs_and_grads(swiglu_reference, double_leaf(gate), double_leaf(up), upstream)
    assert_no_worse_than_torch(got, plain, want)


def test_rejects_what_it_cannot_compute():
    x, cos, sin = rope_inputs((1, 2, 3, 8), torch.float32, transposed=False)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_triton.rope_triton(x, cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="even D"):
        rope_triton.rope_triton(torch.randn(1, 2, 3, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="one shape"):
        swiglu_triton.swiglu_triton(torch.randn(3, 4), torch.randn(4))


def test_registered_and_reached_through_dispatch():
    assert dispatch._registry["rope"]["triton"] is rope_triton.rope_triton
    assert dispatch._registry["swiglu"]["triton"] is swiglu_triton.swiglu_triton
    assert dispatch._registry["rope"]["torch"] is rope_torch.rope_torch
    assert dispatch._registry["swiglu"]["torch"] is swiglu_torch.swiglu_torch
    kernels.configure("torch", rope="triton", swiglu="triton")
    try:
        assert dispatch.resolve("rope", torch.device("cpu")) is rope_triton.rope_triton
        assert dispatch.resolve("swiglu", torch.device("cpu")) is swiglu_triton.swiglu_triton
    finally:
        kernels.configure("auto")
