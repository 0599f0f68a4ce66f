"""Config and weight-name mapping between Tessera and Hugging Face Llama, Mistral, Qwen2 and GPT-2.

Pure functions on dicts and tensors, so conversion never builds a model and keeps every
tensor's dtype and bits. Llama, Mistral and Qwen2 share tensor names and differ in knobs Tessera
has too: RoPE scaling (linear, llama3, yarn), sliding windows (Mistral: every layer; Qwen2: layers
from max_window_layers on), q/k/v biases (Qwen2) and head_dim. Both sides rotate the two halves of
each head in RoPE (`rotate_half`), so q/k rows need no permutation; GPT-2's `Conv1D` stores weights [in, out] and fuses
q/k/v into `c_attn`, so those are transposed and split. A Hugging Face feature Tessera cannot
reproduce raises `ConversionError` naming the config key.
"""
from __future__ import annotations

import dataclasses

import torch

from tessera.core.config import Config, ConfigError, ModelConfig, TrainConfig, validate

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # one tensor layout; the model_type says which knobs exist
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation Tessera's GELU MLP uses


class ConversionError(ValueError):
    """A checkpoint or config that has no exact counterpart on the other side."""


def _unsupported(key: str, value, valid: str) -> ConversionError:
    return ConversionError(f"Hugging Face config {key}={value!r} has no Tessera equivalent; valid: {valid}")


def architecture_of(cfg: ModelConfig) -> str:
    """'llama' (RMSNorm + RoPE + SwiGLU, and Mistral and Qwen2) or 'gpt2' (LayerNorm + learned positions + GELU)."""
    kind = (cfg.norm, cfg.pos, cfg.mlp)
    if kind == ("rmsnorm", "rope", "swiglu"):
        return "llama"
    if kind == ("layernorm", "learned", "gelu"):
        if cfg.kv_heads != cfg.n_heads:
            raise ConversionError(f"model.n_kv_heads={cfg.n_kv_heads}: GPT-2 has no grouped-query attention")
        if cfg.sliding_window or cfg.attn_head_dim not in (0, cfg.d_model // cfg.n_heads):
            raise ConversionError(f"model.sliding_window={cfg.sliding_window}, "
                                  f"model.attn_head_dim={cfg.attn_head_dim}: GPT-2 has neither; valid: 0")
        return "gpt2"
    raise ConversionError(f"model norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp} has no Hugging Face architecture; "
                          "valid: rmsnorm+rope+swiglu (Llama) or layernorm+learned+gelu (GPT-2)")


def _rope_fields(hf: dict) -> dict:
    """ModelConfig RoPE fields of `rope_parameters` (transformers 5) or `rope_scaling` (4.x)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _unsupported("rope_parameters.rope_type", kind, ", ".join(ROPE_TYPES))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported("partial_rotary_factor", rope.get("partial_rotary_factor", hf.get("partial_rotary_factor")),
                           "1.0")
    fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return fields
    original = rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    factor = rope.get("factor")
    if kind == "yarn":
        for key in ("mscale", "mscale_all_dim"):
            if rope.get(key):
                raise _unsupported(f"rope_parameters.{key}", rope[key], "unset (YaRN's attention factor from factor)")
        if rope.get("truncate", True) is not True:
            raise _unsupported("rope_parameters.truncate", rope["truncate"], "true")
        if factor is None and original:
            factor = hf.get("max_position_embeddings", 2048) / original
        fields.update(rope_beta_fast=float(rope.get("beta_fast") or 32.0),
                      rope_beta_slow=float(rope.get("beta_slow") or 1.0),
                      rope_attention_factor=float(rope.get("attention_factor") or 0.0))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]))
    if factor is None:
        raise _unsupported("rope_parameters.factor", None, "a number >= 1")
    return {**fields, "rope_scaling": kind, "rope_factor": float(factor),
            "rope_original_max_seq_len": int(original or 0)}


def _window_fields(hf: dict, arch: str, n_layers: int) -> dict:
    """Mistral: one window on every layer (its model ignores layer_types); Qwen2: on the layers
    `layer_types` (or max_window_layers) marks."""
    window = hf.get("sliding_window")
    if arch == "llama" or not window or (arch == "qwen2" and not hf.get("use_sliding_window", False)):
        return {}
    if arch == "mistral":
        return {"sliding_window": int(window)}
    default = min(hf.get("max_window_layers", 0), n_layers)
    types = hf.get("layer_types") or ["full_attention"] * default + ["sliding_attention"] * (n_layers - default)
    start = types.index("sliding_attention") if "sliding_attention" in types else n_layers
    expected = ["full_attention"] * start + ["sliding_attention"] * (n_layers - start)
    if types != expected:
        raise _unsupported("layer_types", types, "full_attention layers followed by sliding_attention layers")
    return {"sliding_window": int(window), "window_from_layer": start} if start < n_layers else {}


def _llama_config(hf: dict, arch: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "silu")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    if arch == "qwen2":  # q/k/v biases always, none elsewhere
        bias, qkv_bias = False, True
    else:
        bias, qkv_bias = hf.get("attention_bias", False), False
        if hf.get("mlp_bias", False) != bias:
            raise _unsupported("mlp_bias", hf.get("mlp_bias"), f"equal to attention_bias={bias}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_model=d_model, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        pos="rope", mlp="swiglu", bias=bias, qkv_bias=qkv_bias, tie_embeddings=hf.get("tie_word_embeddings", False),
        attn_head_dim=0 if head_dim * n_heads == d_model else head_dim,
        dropout=float(hf.get("attention_dropout", 0.0)), init_std=hf.get("initializer_range", 0.02),
        **_rope_fields(hf), **_window_fields(hf, arch, hf["num_hidden_layers"]),
    )


def _gpt2_config(hf: dict) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in GPT2_GELU:
        raise _unsupported("activation_function", hf["activation_function"], ", ".join(GPT2_GELU))
    for key, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
        if hf.get(key, expected) != expected:
            raise _unsupported(key, hf[key], str(expected))
    drops = {k: hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        raise _unsupported("resid_pdrop/embd_pdrop/attn_pdrop", drops, "one dropout probability for all three")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], n_heads=hf["n_head"], d_model=hf["n_embd"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf.get("n_positions", 1024), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned", mlp="gelu", bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=float(drops["resid_pdrop"]),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_from_hf(hf: dict) -> tuple[str, ModelConfig]:
    """The architecture (a key of ARCHITECTURES) and the Tessera ModelConfig of a Hugging Face config.json."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise _unsupported("model_type", arch, ", ".join(ARCHITECTURES))
    cfg = _gpt2_config(hf) if arch == "gpt2" else _llama_config(hf, arch)
    try:
        validate(Config(model=cfg, train=TrainConfig(seq_len=1)))
    except ConfigError as e:
        raise ConversionError(f"the Hugging Face config does not make a valid Tessera model: {e}") from None
    return arch, cfg


def _rope_to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "none":
        return rope
    rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_seq_len
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_scaling == "yarn":
        rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor:
            rope["attention_factor"] = cfg.rope_attention_factor
    return rope


def llama_family_type(cfg: ModelConfig, prefer: str | None = None) -> str:
    """The Hugging Face model_type that can hold `cfg` ('llama', 'mistral' or 'qwen2'): `prefer` (the
    source checkpoint's type) when it can, else the first that can."""
    fits = {"llama": not cfg.sliding_window and (cfg.bias or not cfg.qkv_bias),
            "mistral": not cfg.window_from_layer and not cfg.bias and not cfg.qkv_bias,
            "qwen2": cfg.qkv_bias and not cfg.bias}
    if fits.get(prefer):
        return prefer
    for name, ok in fits.items():
        if ok:
            return name
    raise ConversionError(f"model.sliding_window={cfg.sliding_window} with window_from_layer={cfg.window_from_layer}, "
                          f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias} has no Hugging Face architecture; valid: a window "
                          "on every layer without biases (Mistral) or from a layer on with q/k/v biases only (Qwen2)")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, prefer: str | None = None) -> dict:
    """A transformers 5 config.json for the Tessera model `cfg` (4.x reads it too, but not its RoPE
    scaling); `prefer` is the model_type to keep when it can hold `cfg`."""
    arch = architecture_of(cfg)
    if arch == "llama":
        arch = llama_family_type(cfg, prefer)
    common = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "dtype": str(dtype).removeprefix("torch."), "use_cache": True}
    if arch != "gpt2":
        out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
               "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
               "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
               "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
               "rope_parameters": _rope_to_hf(cfg), "rope_theta": cfg.rope_theta, "attention_dropout": cfg.dropout}
        if arch == "llama":
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        elif arch == "mistral":
            out["sliding_window"] = cfg.sliding_window or None
        else:
            out.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                       max_window_layers=cfg.window_from_layer if cfg.sliding_window else cfg.n_layers,
                       layer_types=[("sliding_attention" if cfg.window_of(i) else "full_attention")
                                    for i in range(cfg.n_layers)])
        return out
    return {**common, "n_embd": cfg.d_model, "n_inner": cfg.ffn_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "scale_attn_weights": True}


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Tessera name, Hugging Face name) of every Llama tensor but the LM head."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    linears = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
               "attn.wo": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
               "mlp.down": "mlp.down_proj"}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(ours + "attn_norm.weight", theirs + "input_layernorm.weight"),
                  (ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight")]
        pairs += [(f"{ours}{a}.weight", f"{theirs}{b}.weight") for a, b in linears.items()]
        qkv = {a: b for a, b in linears.items() if a in ("attn.wq", "attn.wk", "attn.wv")}
        biased = linears if cfg.bias else qkv if cfg.qkv_bias else {}
        pairs += [(f"{ours}{a}.bias", f"{theirs}{b}.bias") for a, b in biased.items()]
    return pairs


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ConversionError(f"checkpoint lacks tensor {name!r}")
    return tensors.pop(name)


def _check_consumed(left: dict[str, torch.Tensor], ignored: tuple[str, ...] = ()) -> None:
    unexpected = sorted(k for k in left if not k.endswith(ignored))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ConversionError(f"checkpoint has tensor {unexpected[0]!r}{more} that the config does not account for")


def _gpt2_from_hf(t: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": _take(t, prefix + "wte.weight"), "pos_emb.weight": _take(t, prefix + "wpe.weight"),
           "norm.weight": _take(t, prefix + "ln_f.weight"), "norm.bias": _take(t, prefix + "ln_f.bias")}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"{prefix}h.{i}."
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{ours}{a}.weight"], out[f"{ours}{a}.bias"] = _take(t, f"{theirs}{b}.weight"), _take(t, f"{theirs}{b}.bias")
        qkv_w = _take(t, theirs + "attn.c_attn.weight").t().chunk(3, dim=0)
        qkv_b = _take(t, theirs + "attn.c_attn.bias").chunk(3)
        for j, name in enumerate(("wq", "wk", "wv")):
            out[f"{ours}attn.{name}.weight"], out[f"{ours}attn.{name}.bias"] = qkv_w[j], qkv_b[j]
        for a, b in (("attn.wo", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[f"{ours}{a}.weight"] = _take(t, f"{theirs}{b}.weight").t()
            out[f"{ours}{a}.bias"] = _take(t, f"{theirs}{b}.bias")
    return out


def _gpt2_to_hf(t: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 always has biases: a Tessera model without them gets zeros, which compute the same."""
    def get(name: str, like: str) -> torch.Tensor:
        if name in t or cfg.bias:
            return _take(t, name)
        return torch.zeros(t[like].shape[0], dtype=t[like].dtype)

    out = {"transformer.wte.weight": _take(t, "tok_emb.weight"), "transformer.wpe.weight": _take(t, "pos_emb.weight"),
           "transformer.ln_f.bias": get("norm.bias", "norm.weight")}
    out["transformer.ln_f.weight"] = _take(t, "norm.weight")
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{theirs}{b}.bias"] = get(f"{ours}{a}.bias", f"{ours}{a}.weight")
            out[f"{theirs}{b}.weight"] = _take(t, f"{ours}{a}.weight")
        names = [f"{ours}attn.{n}" for n in ("wq", "wk", "wv")]
        out[theirs + "attn.c_attn.bias"] = torch.cat([get(n + ".bias", n + ".weight") for n in names])
        out[theirs + "attn.c_attn.weight"] = torch.cat([_take(t, n + ".weight") for n in names]).t()
        for a, b in (("attn.wo", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[f"{theirs}{b}.bias"] = get(f"{ours}{a}.bias", f"{ours}{a}.weight")
            out[f"{theirs}{b}.weight"] = _take(t, f"{ours}{a}.weight").t()
    return out


def weights_from_hf(arch: str, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Tessera-named tensors; a tied model gets `tok_emb.weight` only (Tessera's loader re-ties)."""
    t = dict(tensors)
    if arch != "gpt2":
        out = {ours: _take(t, theirs) for ours, theirs in _llama_pairs(cfg)}
        head, ignored = "lm_head.weight", ("rotary_emb.inv_freq",)
    else:
        prefix = "transformer." if any(k.startswith("transformer.") for k in t) else ""
        out = _gpt2_from_hf(t, cfg, prefix)
        head, ignored = "lm_head.weight", (".attn.bias", ".attn.masked_bias")
    if cfg.tie_embeddings:
        t.pop(head, None)
    else:
        out["lm_head.weight"] = _take(t, head)
    _check_consumed(t, ignored)
    return {k: v.contiguous() for k, v in out.items()}


def weights_to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors of a Tessera state dict; a tied model stores no `lm_head.weight`."""
    t = dict(tensors)
    if cfg.tie_embeddings and "tok_emb.weight" not in t:
        t["tok_emb.weight"] = t.pop("lm_head.weight")
    head = None if cfg.tie_embeddings else _take(t, "lm_head.weight")
    t.pop("lm_head.weight", None)
    if architecture_of(cfg) == "llama":
        out = {theirs: _take(t, ours) for ours, theirs in _llama_pairs(cfg)}
    else:
        out = _gpt2_to_hf(t, cfg)
    if head is not None:
        out["lm_head.weight"] = head
    _check_consumed(t)
    return {k: v.contiguous() for k, v in out.items()}


def with_architecture_of(source: ModelConfig, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every architecture field taken from `source` (training knobs such as dropout kept)."""
    keep = {"preset", "dropout", "init_from"}
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in keep}
    return dataclasses.replace(cfg, preset="", **fields)
