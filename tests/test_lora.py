"""LoRA adapters: a no-op at start, only adapters train, gradients match the formula, merging
and saving keep the function."""
import pytest
import torch
import torch.nn as nn

from tessera.core.config import LoraConfig, ModelConfig
from tessera.core.lora import LoRALinear, apply_lora, load_adapters, merge_lora, save_adapters
from tessera.core.model import Transformer


def model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=37, n_layers=2, d_model=24, n_heads=4, n_kv_heads=2, norm="rmsnorm",
                                   pos="rope", mlp="swiglu", d_ff=40, max_seq_len=16))


def with_random_adapters(m, cfg=LoraConfig(r=3, alpha=6.0)):
    apply_lora(m, cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    return m


def test_starts_as_the_base_model_and_trains_only_adapters():
    base, adapted = model(), apply_lora(model(), LoraConfig(r=4))
    idx = torch.randint(0, 37, (3, 11))
    torch.testing.assert_close(adapted(idx), base(idx), rtol=0, atol=0)
    assert set(base.state_dict()) <= set(adapted.state_dict())  # base checkpoint keys unchanged
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in adapted.modules()) == 2 * 7
    frozen = {n: p.clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        adapted(idx, idx).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in adapted.named_parameters() if n in frozen)
    assert not torch.equal(adapted(idx), base(idx))


def test_gradients_match_the_formula_in_float64():
    torch.manual_seed(1)
    base = nn.Linear(5, 7, dtype=torch.float64)
    layer = LoRALinear(base, LoraConfig(r=2, alpha=3.0))
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    upstream = torch.randn(4, 7, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    a, b = layer.lora_a.detach().double().requires_grad_(), layer.lora_b.detach().double().requires_grad_()
    ref = x @ base.weight.detach().T + base.bias.detach() + 1.5 * (x @ a.T) @ b.T
    (ref * upstream).sum().backward()
    torch.testing.assert_close(layer.lora_a.grad.double(), a.grad)
    torch.testing.assert_close(layer.lora_b.grad.double(), b.grad)
    assert base.weight.grad is None


def test_merge_keeps_the_function_and_gives_a_plain_model():
    m = with_random_adapters(model())
    idx = torch.randint(0, 37, (2, 13))
    expected = m(idx)
    merged = merge_lora(m)
    assert not any(isinstance(x, LoRALinear) for x in merged.modules())
    torch.testing.assert_close(merged(idx), expected, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(model().state_dict())


def test_adapters_save_alone_and_load_onto_a_fresh_base(tmp_path):
    m = with_random_adapters(model())
    save_adapters(m, LoraConfig(r=3, alpha=6.0), tmp_path)
    fresh = model()
    cfg = load_adapters(fresh, tmp_path)
    assert cfg.r == 3
    idx = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(fresh(idx), m(idx), rtol=0, atol=0)
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert size < sum(p.numel() for p in model().parameters()) * 4 / 2  # adapters only, not the base


def test_unknown_targets_the_lm_head_and_rank_zero_are_refused():
    with pytest.raises(ValueError, match="no linear layer named"):
        apply_lora(model(), LoraConfig(r=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="lm_head, whose weight the loss reads directly"):
        apply_lora(model(), LoraConfig(r=2, targets=("wq", "lm_head")))
    with pytest.raises(ValueError, match="must be >= 1"):
        apply_lora(model(), LoraConfig(r=0))
