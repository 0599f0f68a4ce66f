"""The model trained through the Triton kernels (interpreted on CPU) matches the torch kernels.

Tolerances come from the computation, not from one CPU: the first step's gradients must agree to
fp32 reassociation error relative to the model's gradient scale (an analytically zero gradient,
such as a key bias's, is pure rounding noise of the terms it sums); the later steps use SGD,
whose update is linear in the gradient, so the parameters may differ by at most
lr x steps x that gradient error. (Adam divides by sqrt(v): a near-zero gradient's rounding becomes an update of ~lr, which
is why comparing AdamW runs element by element depends on the machine.)
"""
import pytest
import torch

pytest.importorskip("triton")

from tessera import kernels  # noqa: E402
from tessera.core.config import ModelConfig  # noqa: E402
from tessera.core.engine import LocalEngine  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402

LR, STEPS = 0.05, 5
GRAD_RTOL = 1e-4  # fp32 sums reassociated: ~sqrt(terms) * 2^-24 relative, with a wide margin


def grad_atol(grads: list[torch.Tensor]) -> float:
    return GRAD_RTOL * max(g.abs().max().item() for g in grads)


def train(backend: str, style: dict) -> tuple[list[float], list[torch.Tensor], Transformer]:
    """Losses and first-step gradients of STEPS SGD steps through `backend`'s kernels."""
    kernels.configure(backend)
    try:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=53, n_layers=2, n_heads=4, d_model=32, max_seq_len=24, **style))
        engine = LocalEngine(model, torch.optim.SGD(model.parameters(), lr=LR), torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        losses, first_grads = [], []
        for step in range(STEPS):
            data = torch.randint(0, 53, (2, 21), generator=g)
            losses.append(engine.forward_backward((data[:, :-1], data[:, 1:])).item())
            if step == 0:
                first_grads = [p.grad.clone() for p in model.parameters()]
            engine.clip_grad_norm(1.0)
            engine.step()
            engine.zero_grad()
        return losses, first_grads, model
    finally:
        kernels.configure("auto")


@pytest.mark.parametrize("style", [
    dict(norm="layernorm", pos="learned", mlp="gelu", bias=True),
    dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=2),
])
def test_five_steps_through_triton_match_torch(style):
    ref_losses, ref_grads, ref = train("torch", style)
    tri_losses, tri_grads, tri = train("triton", style)
    atol = grad_atol(ref_grads)
    for a, b in zip(ref_grads, tri_grads):
        torch.testing.assert_close(b, a, rtol=GRAD_RTOL, atol=atol)
    for a, b in zip(ref.parameters(), tri.parameters()):
        torch.testing.assert_close(b, a, rtol=GRAD_RTOL, atol=LR * STEPS * atol)
    assert tri_losses == pytest.approx(ref_losses, rel=GRAD_RTOL)
    assert ref_losses[-1] < ref_losses[0]  # the steps trained something, so the comparison means something


def test_every_op_has_a_triton_implementation():
    for op in kernels.dispatch.OPS:
        assert "triton" in kernels.dispatch._registry[op], op
