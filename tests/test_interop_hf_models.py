"""The models people fine-tune today, both ways through `tessera convert`: Llama 3.1-style RoPE
scaling (llama3, linear, yarn), a head_dim of its own, Mistral's sliding window and Qwen2's q/k/v
biases and per-layer window. Tiny random models that transformers builds and saves are the
reference; sequences run past the window and past the pretraining context the scaling stretches."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from tessera import kernels  # noqa: E402
from tessera.cli.main import main  # noqa: E402
from tessera.core.checkpoint import load_model_from_checkpoint  # noqa: E402
from tessera.core.config import ModelConfig  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402
from tessera.interop.hf import ConversionError, convert_to_hf  # noqa: E402
from tessera.interop.hf_mapping import config_from_hf, config_to_hf  # noqa: E402
from tessera.interop.safetensors_io import read_state_dict  # noqa: E402

SEQ = 40  # > every window below, > original_max_position_embeddings=16
BASE = dict(vocab_size=67, hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0}
CASES = {
    "llama-llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "llama-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 300.0})),
    "llama-yarn-head_dim": ("llama", dict(rope_parameters=YARN, head_dim=10, tie_word_embeddings=True)),
    "llama-yarn-attention_factor": ("llama", dict(rope_parameters={**YARN, "attention_factor": 1.25, "beta_fast": 8.0,
                                                                   "beta_slow": 2.0})),
    "mistral": ("mistral", dict(sliding_window=7, head_dim=8)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=9, max_window_layers=1, rope_parameters=LLAMA3)),
    "qwen2-full": ("qwen2", dict(use_sliding_window=False)),
}
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(autouse=True)
def torch_kernels():
    kernels.configure("torch")


def _hf_model(arch: str, extra: dict):
    torch.manual_seed(0)
    config = getattr(transformers, CONFIGS[arch])(**{**BASE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their init values, so a mix-up would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return type(model).__name__, model(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_from_hf_matches_transformers_and_goes_back(tmp_path, case):
    arch, extra = CASES[case]
    hf = _hf_model(arch, extra)
    hf.save_pretrained(tmp_path / "src")
    assert main(["convert", "from-hf", str(tmp_path / "src"), str(tmp_path / "tessera")]) == 0
    model = load_model_from_checkpoint(tmp_path / "tessera").eval()
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert (got - want).abs().max().item() <= 1e-4
    # the knob matters at this length: without it the logits differ
    plain = Transformer(ModelConfig(**{**model.cfg.__dict__, "rope_scaling": "none", "sliding_window": 0,
                                       "window_from_layer": 0})).eval()
    plain.load_state_dict(model.state_dict())
    if case != "qwen2-full":
        with torch.no_grad():
            assert (plain(ids) - want).abs().max().item() > 1e-3

    assert main(["convert", "to-hf", str(tmp_path / "tessera"), str(tmp_path / "back")]) == 0
    original, returned = read_state_dict(tmp_path / "src"), read_state_dict(tmp_path / "back")
    assert set(original) == set(returned) and all(torch.equal(original[k], returned[k]) for k in original)
    name, again = _hf_logits(tmp_path / "back", ids)
    assert name == CLASSES[arch]
    assert (again - want).abs().max().item() <= 1e-6


TESSERA = dict(vocab_size=53, n_layers=3, n_heads=4, n_kv_heads=2, d_model=32, d_ff=40, max_seq_len=64,
               norm="rmsnorm", pos="rope", mlp="swiglu", norm_eps=1e-5, tie_embeddings=False, rope_theta=700.0)


@pytest.mark.parametrize("knobs, hf_class", [
    (dict(sliding_window=6, attn_head_dim=12), "MistralForCausalLM"),
    (dict(sliding_window=5, window_from_layer=2, qkv_bias=True, rope_scaling="yarn", rope_factor=3.0,
          rope_original_max_seq_len=16), "Qwen2ForCausalLM"),
    (dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_seq_len=16, bias=True), "LlamaForCausalLM"),
])
def test_to_hf_matches_transformers(tmp_path, knobs, hf_class):
    from safetensors.torch import save_model

    cfg = ModelConfig(**TESSERA, **knobs)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    (tmp_path / "ckpt").mkdir()
    save_model(model, str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg.__dict__))
    out = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    ids = _ids(cfg.vocab_size)
    name, theirs = _hf_logits(out, ids)
    assert name == hf_class
    with torch.no_grad():
        assert (theirs - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("patch, key", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {**YARN, "mscale": 0.7, "mscale_all_dim": 0.7}}, "mscale"),
    ({"rope_parameters": {**YARN, "truncate": False}}, "truncate"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "falcon"}, "model_type"),
])
def test_unsupported_llama_features_are_named(patch, key):
    base = transformers.LlamaConfig(**BASE).to_dict()
    with pytest.raises(ConversionError, match=key) as e:
        config_from_hf({**base, **patch})
    assert "\n" not in str(e.value)


def test_interleaved_windows_are_named():
    base = transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=4).to_dict()
    with pytest.raises(ConversionError, match="layer_types"):
        config_from_hf({**base, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})
    cfg = ModelConfig(**TESSERA, sliding_window=4, window_from_layer=1)
    with pytest.raises(ConversionError, match="no Hugging Face architecture"):
        config_to_hf(cfg, torch.float32)
