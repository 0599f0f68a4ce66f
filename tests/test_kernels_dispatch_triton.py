"""The model trained through the Triton kernels (interpreted on CPU) matches the torch kernels."""
import pytest
import torch

pytest.importorskip("triton")

from tessera import kernels  # noqa: E402
from tessera.core.config import ModelConfig, OptimConfig  # noqa: E402
from tessera.core.engine import LocalEngine  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402
from tessera.core.optim import build_optimizer  # noqa: E402


def train(backend: str, style: dict, steps: int = 5) -> tuple[list[float], Transformer]:
    kernels.configure(backend)
    try:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=53, n_layers=2, n_heads=4, d_model=32, max_seq_len=24, **style))
        engine = LocalEngine(model, build_optimizer(model, OptimConfig(lr=3e-3), torch.device("cpu")), torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            data = torch.randint(0, 53, (2, 21), generator=g)
            losses.append(engine.forward_backward((data[:, :-1], data[:, 1:])).item())
            engine.clip_grad_norm(1.0)
            engine.step()
            engine.zero_grad()
        return losses, model
    finally:
        kernels.configure("auto")


@pytest.mark.parametrize("style", [
    dict(norm="layernorm", pos="learned", mlp="gelu", bias=True),
    dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=2),
])
def test_five_steps_through_triton_match_torch(style):
    ref_losses, ref = train("torch", style)
    tri_losses, tri = train("triton", style)
    assert tri_losses == pytest.approx(ref_losses, abs=1e-5)
    for a, b in zip(ref.parameters(), tri.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_every_op_has_a_triton_implementation():
    for op in kernels.dispatch.OPS:
        assert "triton" in kernels.dispatch._registry[op], op
