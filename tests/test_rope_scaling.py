"""Scaled RoPE frequencies against transformers' own `modeling_rope_utils`, and their config checks."""
import pytest
import torch

from tessera.core.config import ConfigError, ModelConfig, load_config
from tessera.core.rope_scaling import attention_factor, inv_freq, rope_tables

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CASES = [
    ("linear", {"factor": 3.0}, {}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
     {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 16}),
    ("llama3", {"factor": 2.5, "low_freq_factor": 0.5, "high_freq_factor": 3.0, "original_max_position_embeddings": 64},
     {"rope_low_freq_factor": 0.5, "rope_high_freq_factor": 3.0, "rope_original_max_seq_len": 64}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16}, {"rope_original_max_seq_len": 16}),
    ("yarn", {"factor": 6.0, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3,
              "original_max_position_embeddings": 32},
     {"rope_beta_fast": 16.0, "rope_beta_slow": 2.0, "rope_attention_factor": 1.3, "rope_original_max_seq_len": 32}),
]


@pytest.mark.parametrize("kind, hf_params, ours", CASES)
@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (64, 500000.0)])
def test_frequencies_match_transformers(kind, hf_params, ours, head_dim, theta):
    hf = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                  max_position_embeddings=128,
                                  rope_parameters={"rope_type": kind, "rope_theta": theta, **hf_params})
    want_freq, want_scale = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    cfg = ModelConfig(n_heads=2, d_model=2 * head_dim, pos="rope", rope_theta=theta, rope_scaling=kind,
                      rope_factor=hf_params["factor"], max_seq_len=128, **ours)
    torch.testing.assert_close(inv_freq(cfg), want_freq.float(), rtol=1e-6, atol=0)
    assert attention_factor(cfg) == pytest.approx(want_scale, rel=1e-12)
    assert not torch.equal(inv_freq(cfg), inv_freq(ModelConfig(n_heads=2, d_model=2 * head_dim, rope_theta=theta)))


def test_tables_scale_cos_and_sin_by_the_attention_factor():
    cfg = ModelConfig(n_heads=1, d_model=16, pos="rope", rope_scaling="yarn", rope_factor=4.0,
                      rope_original_max_seq_len=8)
    cos, sin = rope_tables(cfg, torch.arange(40)[None])
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, attention_factor(cfg) ** 2))


@pytest.mark.parametrize("overrides, message", [
    (["--model.rope_scaling=ntk"], "valid: none, linear, llama3, yarn"),
    (["--model.rope_scaling=llama3", "--model.rope_factor=8.0"], "needs model.rope_original_max_seq_len > 0"),
    (["--model.rope_scaling=linear", "--model.rope_factor=0.5"], "must be >= 1"),
    (["--model.rope_scaling=linear", "--model.rope_factor=2.0", "--model.pos=learned"], "needs model.pos='rope'"),
    (["--model.sliding_window=0"], None),
    (["--model.sliding_window=-4"], "must be >= 0"),
    (["--model.window_from_layer=2"], "needs model.sliding_window > 0"),
    (["--model.attn_head_dim=7"], "even head dim"),
    (["--model.attn_head_dim=-2"], "must be >= 0"),
])
def test_out_of_range_values_are_refused(overrides, message):
    args = ["--model.pos=rope", *overrides]
    if message is None:
        load_config(None, args)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)
