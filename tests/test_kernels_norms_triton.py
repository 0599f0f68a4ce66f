"""Triton LayerNorm/RMSNorm (run by the Triton interpreter on CPU) against float64 math."""
import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():
    torch.set_default_device("cuda")  # on a GPU these run the compiled kernels (benchmarks/gpu_suite.sh)


from tessera.kernels import dispatch, norms_torch, norms_triton

EPS = {"layer": 1e-5, "rms": 1e-6}


def reference(x, w, b, r, rms):
    """float64 norm(x + r) written out: mean, biased variance, rsqrt. Returns (normed, total|None)."""
    total = x + r if r is not None else x
    if rms:
        y = total * torch.rsqrt((total * total).mean(-1, keepdim=True) + EPS["rms"]) * w
    else:
        mean = total.mean(-1, keepdim=True)
        var = ((total - mean) ** 2).mean(-1, keepdim=True)
        y = (total - mean) * torch.rsqrt(var + EPS["layer"]) * w
        if b is not None:
            y = y + b
    return y, total if r is not None else None


def make_inputs(shape, dtype, has_bias, has_residual):
    n = shape[-1]
    x = torch.randn(*shape) * 2 + 0.5  # an offset, so LayerNorm's mean matters
    w, b = torch.randn(n), torch.randn(n) if has_bias else None
    r = torch.randn(*shape) if has_residual else None
    return [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b, r)]


IMPLS = {
    norms_triton: (norms_triton.layer_norm_triton, norms_triton.rms_norm_triton),
    norms_torch: (norms_torch.layer_norm_torch, norms_torch.rms_norm_torch),
}


def run(module, rms, x, w, b, r):
    """(normed, total) from a backend module; total is None without a residual."""
    layer_norm, rms_norm = IMPLS[module]
    out = rms_norm(x, w, EPS["rms"], residual=r) if rms else layer_norm(x, w, b, EPS["layer"], residual=r)
    return out if r is not None else (out, None)


def outputs_and_grads(outs, inputs, upstream):
    """Outputs then gradients of sum(out * upstream) w.r.t. every non-None input."""
    outs = [o for o in outs if o is not None]
    leaves = [t for t in inputs if t is not None]
    objective = sum((o.double() * g).sum() for o, g in zip(outs, upstream))
    return [o.double() for o in outs] + [g.double() for g in torch.autograd.grad(objective, leaves)]


def as_double_leaves(inputs):
    return [t.detach().double().requires_grad_() if t is not None else None for t in inputs]


@pytest.mark.parametrize("shape", [(37, 300), (64, 256), (3, 5, 96), (9, 12289)])  # the last: dW/dB summed in memory
@pytest.mark.parametrize("kind", ["layer", "layer_no_bias", "rms"])
@pytest.mark.parametrize("has_residual", [False, True])
def test_forward_and_gradients_match_float64(shape, kind, has_residual):
    torch.manual_seed(shape[0] * 7 + len(kind) + has_residual)
    rms = kind == "rms"
    inputs = make_inputs(shape, torch.float32, kind == "layer", has_residual)
    outs = run(norms_triton, rms, *inputs)
    upstream = [torch.randn(shape, dtype=torch.float64) for o in outs if o is not None]
    got = outputs_and_grads(outs, inputs, upstream)
    ref_inputs = as_double_leaves(inputs)
    want = outputs_and_grads(reference(*ref_inputs, rms), ref_inputs, upstream)
    assert len(got) == len(want) == 1 + has_residual + sum(t is not None for t in inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rms", [False, True])
def test_residual_with_only_one_output_used(rms):
    torch.manual_seed(3)
    x, w, b, r = make_inputs((9, 300), torch.float32, not rms, True)
    normed, total = run(norms_triton, rms, x, w, b, r)
    (gx, gw, gr) = torch.autograd.grad(normed.sum(), (x, w, r))
    rx, rw, rb, rr = as_double_leaves((x, w, b, r))
    ref_normed, _ = reference(rx, rw, rb, rr, rms)
    (ex, ew, er) = torch.autograd.grad(ref_normed.sum(), (rx, rw, rr))
    for a, e in ((gx, ex), (gw, ew), (gr, er)):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
    normed, total = run(norms_triton, rms, x, w, b, r)
    (gx, gr) = torch.autograd.grad(total.sum(), (x, r))
    assert (gx == 1).all() and (gr == 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_low_precision_error_no_worse_than_torch(dtype, rms):
    """Outputs and gradients in half precision: within 2x the error of the torch kernels."""
    torch.manual_seed(11)
    inputs = make_inputs((37, 300), dtype, not rms, True)
    ref_inputs = as_double_leaves(inputs)
    upstream = [torch.randn(37, 300, dtype=torch.float64) for _ in range(2)]
    got = outputs_and_grads(run(norms_triton, rms, *inputs), inputs, upstream)
    plain = outputs_and_grads(run(norms_torch, rms, *inputs), inputs, upstream)
    want = outputs_and_grads(reference(*ref_inputs, rms), ref_inputs, upstream)
    for a, p, e in zip(got, plain, want):
        err, plain_err = (a - e).abs().max(), (p - e).abs().max()
        assert err <= 2 * plain_err + 1e-6 * e.abs().max(), (err, plain_err)


def test_registered_under_triton_backend():
    assert dispatch._registry["layer_norm"]["triton"] is norms_triton.layer_norm_triton
    assert dispatch._registry["rms_norm"]["triton"] is norms_triton.rms_norm_triton
