import math

import pytest
import torch

from tessera.core.config import ModelConfig, OptimConfig
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer, lr_at, param_groups


def test_weight_decay_only_on_linear_weight_matrices():
    model = Transformer(ModelConfig(vocab_size=11, n_layers=1, n_heads=2, d_model=8, max_seq_len=8, bias=True,
                                    tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {"layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.0.attn.wv.weight",
                       "layers.0.attn.wo.weight", "layers.0.mlp.up.weight", "layers.0.mlp.down.weight",
                       "lm_head.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_decay["weight_decay"] == 0.0


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)
    mid = 10 + 25
    assert lr_at(mid, cfg, 110) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)


def test_warmup_stable_decay():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_steps=20)
    assert [lr_at(s, cfg, 100) for s in (4, 5, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_at(90, cfg, 100) == pytest.approx(0.5)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_every_implementation_takes_the_same_step(impl):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, n_layers=1, n_heads=2, d_model=8, max_seq_len=8))
    ref = Transformer(model.cfg)
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 11, (2, 8))
    for m, kind in ((model, impl), (ref, "loop")):
        opt = build_optimizer(m, OptimConfig(impl=kind), torch.device("cpu"))
        for _ in range(3):
            m(x, x).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
