import math

import pytest
import torch

from tessera import kernels
from tessera.core.config import ModelConfig, load_config
from tessera.core.kv_cache import KVCache
from tessera.core.model import Transformer
from tessera.core.rope_scaling import rope_tables


def tiny(**kw):
    base = dict(vocab_size=53, n_layers=2, n_heads=4, d_model=32, max_seq_len=40)
    return ModelConfig(**{**base, **kw})


LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=2, tie_embeddings=False, d_ff=48)
GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)
# Mistral/Qwen2-style knobs: sliding window, q/k/v biases only, heads wider than d_model / n_heads, yarn RoPE
WINDOWED = dict(LLAMA, sliding_window=5, qkv_bias=True, attn_head_dim=12, rope_scaling="yarn", rope_factor=4.0,
                rope_original_max_seq_len=8)


def test_gpt2_124m_has_the_original_parameter_count():
    cfg = load_config(None, ["--model.preset=gpt2-124m"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == 124_439_808


@pytest.mark.parametrize("preset, billions", [("llama-1b", 1.236), ("llama-8b", 8.030), ("llama-70b", 70.554)])
def test_llama_presets_match_published_sizes(preset, billions):
    with torch.device("meta"):
        model = Transformer(load_config(None, [f"--model.preset={preset}"]).model)
    assert model.num_params() / 1e9 == pytest.approx(billions, abs=1e-3)


def test_flops_per_token_counts_matmuls():
    cfg = tiny(**GPT2)
    model = Transformer(cfg)
    n = model.num_params() - cfg.max_seq_len * cfg.d_model  # tied: the lm head is the token embedding
    assert model.flops_per_token(16) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 16


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = tiny(n_layers=8, d_model=256, n_heads=4, vocab_size=4000)
    model = Transformer(cfg)
    assert model.layers[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attn.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.lm_head.weight is model.tok_emb.weight


def test_rope_rotates_halves_and_preserves_norm():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    pos = torch.arange(5).expand(2, 5)
    cos, sin = rope_tables(ModelConfig(n_heads=1, d_model=8, pos="rope"), pos)
    y = kernels.rope(x, cos.double(), sin.double())
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # position 0 is the identity; the first pair (dims 0 and 4) turns by angle = position
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    p = 3
    c, s = math.cos(p), math.sin(p)
    torch.testing.assert_close(y[:, :, p, 0], x[:, :, p, 0] * c - x[:, :, p, 4] * s)
    torch.testing.assert_close(y[:, :, p, 4], x[:, :, p, 4] * c + x[:, :, p, 0] * s)


@pytest.mark.parametrize("style", [GPT2, LLAMA, WINDOWED])
def test_cached_forward_equals_full_forward(style):
    torch.manual_seed(1)
    model = Transformer(tiny(**style)).double().eval()
    idx = torch.randint(0, 53, (3, 19))
    full = model(idx)
    cache = KVCache(2, 3, model.cfg.kv_heads, model.cfg.head_dim, 40, idx.device, torch.float64)
    parts = [model(idx[:, :11], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(11, 19)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("style", [GPT2, LLAMA, WINDOWED])
def test_loss_and_gradients_match_plain_cross_entropy(style):
    torch.manual_seed(2)
    model = Transformer(tiny(**style)).double()
    idx, targets = torch.randint(0, 53, (2, 13)), torch.randint(0, 53, (2, 13))
    loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(model(idx).reshape(-1, 53), targets.reshape(-1))
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, list(model.parameters()))
    r = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b)


def test_sliding_window_bounds_what_each_position_sees():
    """With L layers of window W, position t reads tokens back to t - L (W - 1) and no further."""
    torch.manual_seed(4)
    model = Transformer(tiny(**WINDOWED)).double().eval()
    idx = torch.randint(0, 53, (1, 30))
    changed = idx.clone()
    changed[0, 3] = (idx[0, 3] + 1) % 53
    diff = (model(idx) - model(changed)).abs().amax(-1)[0]
    reach = 3 + 2 * (5 - 1)
    assert (diff[3 : reach + 1] > 1e-9).all()
    assert (diff[reach + 1 :] == 0).all() and (diff[:3] == 0).all()


def test_knobs_shape_the_attention_projections():
    attn = Transformer(tiny(**WINDOWED)).layers[1].attn
    assert attn.wq.weight.shape == (4 * 12, 32) and attn.wk.weight.shape == (2 * 12, 32)
    assert attn.wq.bias is not None and attn.wv.bias is not None and attn.wo.bias is None
    assert attn.window == 5
    layers = Transformer(tiny(**dict(WINDOWED, window_from_layer=1))).layers
    assert [blk.attn.window for blk in layers] == [0, 5]


def test_packed_documents_give_the_same_logits_as_separate_runs():
    torch.manual_seed(3)
    model = Transformer(tiny(**LLAMA)).double().eval()
    a, b = torch.randint(0, 53, (1, 9)), torch.randint(0, 53, (1, 6))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 6])
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    out = model(packed, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :9], model(a))
    torch.testing.assert_close(out[:, 9:], model(b))


def test_dropout_is_active_only_in_training():
    torch.manual_seed(4)
    model = Transformer(tiny(dropout=0.5))
    idx = torch.randint(0, 53, (2, 7))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))
