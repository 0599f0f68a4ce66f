"""Hugging Face conversion: Tessera -> HF loads in transformers with the same logits and greedy
tokens; HF -> Tessera matches transformers' own model; HF -> Tessera -> HF is bitwise lossless."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tessera import kernels  # noqa: E402
from tessera.core.checkpoint import load_model_from_checkpoint  # noqa: E402
from tessera.core.config import ConfigError, ModelConfig  # noqa: E402
from tessera.core.generate import Sampling, generate_tokens  # noqa: E402
from tessera.core.model import Transformer  # noqa: E402
from tessera.interop.hf import (  # noqa: E402
    ConversionError, convert_from_hf, convert_to_hf, init_model_config, init_tokenizer_path, load_init_weights,
)
from tessera.interop.safetensors_io import INDEX, read_state_dict  # noqa: E402

LLAMA = dict(n_layers=2, n_heads=6, n_kv_heads=2, d_model=36, d_ff=52, max_seq_len=48,
             norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, rope_theta=500.0, norm_eps=1e-6)
GPT2 = dict(n_layers=2, n_heads=3, d_model=30, d_ff=44, max_seq_len=40,
            norm="layernorm", pos="learned", mlp="gelu", bias=True)


@pytest.fixture(autouse=True)
def torch_kernels():
    kernels.configure("torch")


def _save_tessera(tmp_path, cfg: ModelConfig, char_tokenizer=None, seed=0):
    from safetensors.torch import save_model

    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # norms and biases away from their init values, so a mix-up would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ckpt = tmp_path / "tessera"
    ckpt.mkdir()
    save_model(model, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(cfg.__dict__))
    if char_tokenizer is not None:
        char_tokenizer.save(ckpt)
    return model.eval(), ckpt


def _ids(vocab, b=2, s=13, seed=1):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,tie,bias", [("llama", False, False), ("llama", True, True), ("gpt2", True, True),
                                           ("gpt2", False, True), ("gpt2", True, False)])
def test_to_hf_matches_transformers(tmp_path, arch, tie, bias, char_tokenizer):
    cfg = ModelConfig(**{**(LLAMA if arch == "llama" else GPT2), "bias": bias}, tie_embeddings=tie,
                      vocab_size=char_tokenizer.vocab_size + 3)
    model, ckpt = _save_tessera(tmp_path, cfg, char_tokenizer)
    out = convert_to_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = ids[0, :5].tolist()
    ours = generate_tokens(model, [prompt], 12, sampling=Sampling(temperature=0))[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 5:].tolist()
    assert ours == theirs
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("to be")["input_ids"] == char_tokenizer.encode("to be")


def _hf_model(arch: str, tie: bool):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=61, hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=3, max_position_embeddings=32, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    else:
        config = transformers.GPT2Config(vocab_size=59, n_embd=30, n_layer=2, n_head=5, n_positions=32,
                                         tie_word_embeddings=tie)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)])
def test_from_hf_matches_and_round_trips(tmp_path, arch, tie):
    hf = _hf_model(arch, tie)
    hf.save_pretrained(tmp_path / "src")
    ckpt = convert_from_hf(tmp_path / "src", tmp_path / "tessera")
    model = load_model_from_checkpoint(ckpt)
    assert model.cfg.tie_embeddings == tie
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4

    back = convert_to_hf(ckpt, tmp_path / "back", max_shard_size="20KB")
    assert (back / INDEX).exists() and len(list(back.glob("model-*.safetensors"))) > 1
    original, returned = load_file(str(tmp_path / "src" / "model.safetensors")), read_state_dict(back)
    assert set(original) == set(returned)
    for name, t in original.items():
        assert t.dtype == returned[name].dtype and torch.equal(t, returned[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_dtype_kept_and_sharded_input(tmp_path):
    hf = _hf_model("llama", False).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    assert (tmp_path / "src" / INDEX).exists()
    ckpt = convert_from_hf(tmp_path / "src", tmp_path / "tessera")
    stored = load_file(str(ckpt / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    back = convert_to_hf(ckpt, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    original = read_state_dict(tmp_path / "src")
    returned = read_state_dict(back)
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_init_from_hf(tmp_path):
    hf = _hf_model("gpt2", True)
    hf.save_pretrained(tmp_path / "src")
    cfg = init_model_config(ModelConfig(init_from=f"hf:{tmp_path / 'src'}", dropout=0.05))
    assert (cfg.d_model, cfg.n_layers, cfg.dropout, cfg.pos) == (30, 2, 0.05, "learned")
    model = Transformer(cfg).eval()
    load_init_weights(model, cfg.init_from)
    ids = _ids(59)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
    assert model.lm_head.weight is model.tok_emb.weight
    assert init_tokenizer_path(cfg) is None  # the source ships no tokenizer
    with pytest.raises(ConfigError, match="init_from"):
        init_model_config(ModelConfig(init_from=str(tmp_path / "nowhere")))


def test_unsupported_features_are_named(tmp_path):
    from tessera.interop.hf_mapping import config_from_hf

    base = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                    intermediate_size=40, vocab_size=50).to_dict()
    with pytest.raises(ConversionError, match="rope_type"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(ConversionError, match="hidden_act"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConversionError, match="model_type"):
        config_from_hf({"model_type": "falcon"})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(base))
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        convert_from_hf(pickled, tmp_path / "out")


def test_hf_tokenizer_is_carried_and_loads_in_tessera(tmp_path, corpus_text):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tessera.core.tokenizer import load_tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([corpus_text[:20_000]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    hf = _hf_model("gpt2", True)
    hf.save_pretrained(tmp_path / "src")
    hf_tok.save_pretrained(tmp_path / "src")
    ckpt = convert_from_hf(tmp_path / "src", tmp_path / "tessera")
    tok = load_tokenizer(ckpt)
    assert tok.eos_id == tok.pad_id == tok.bos_id == hf_tok.eos_token_id
    assert tok.encode("First Citizen:") == hf_tok("First Citizen:")["input_ids"]
    back = convert_to_hf(ckpt, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["eos_token_id"] == hf_tok.eos_token_id
    assert transformers.AutoTokenizer.from_pretrained(back).eos_token == "<|endoftext|>"
