"""Typed run configuration: frozen dataclasses loaded from TOML with `--section.key=value` overrides.

Every value is checked against its annotation when the config is built, so a typo or a wrong
type fails at start-up with one line naming the key and what is valid, not an hour into a run.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is valid."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = ""  # name of a file in configs/models/ whose values are the defaults
    vocab_size: int = 0  # 0: taken from the tokenizer of the prepared data
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: equal to n_heads (multi-head); fewer: grouped-query attention
    d_model: int = 128
    d_ff: int = 0  # 0: 4*d_model for GELU, 8/3*d_model rounded up to ffn_multiple_of for SwiGLU
    ffn_multiple_of: int = 256
    max_seq_len: int = 1024
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    # RoPE context extension (core/rope_scaling.py): the frequencies of a model pretrained on
    # rope_original_max_seq_len tokens, stretched by rope_factor (Llama 3.1: llama3; YaRN: yarn).
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int = 0  # llama3 and yarn: the pretraining context
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn: scale of cos/sin; 0: 0.1 * ln(rope_factor) + 1
    attn_head_dim: int = 0  # 0: d_model / n_heads; other values decouple head width from d_model
    sliding_window: int = 0  # 0: full causal attention; N: a query sees its last N keys (itself included)
    window_from_layer: int = 0  # layers from this index on use sliding_window (Qwen2's max_window_layers)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2); `bias` puts them everywhere
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    init_from: str = ""  # "hf:DIR" (a Hugging Face checkpoint) or a Tessera checkpoint: architecture and weights

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    def window_of(self, layer: int) -> int:
        """The sliding window of layer `layer` (0: full causal attention)."""
        return self.sliding_window if layer >= self.window_from_layer else 0

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        hidden = int(8 * self.d_model / 3)
        return -(-hidden // self.ffn_multiple_of) * self.ffn_multiple_of


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # directory written by `tessera data prepare`
    tokenizer: str = ""  # optional tokenizer.json; its hash must match the data's manifest
    num_workers: int = 0
    shuffle_buffer: int = 256  # windows held by the shuffle buffer
    on_error: Literal["raise", "skip"] = "raise"
    # SFT: micro-batches of whole samples totalling at most this many tokens, packed into one row with
    # document masks (train.batch_size=1); 0: train.batch_size rows of train.seq_len
    max_tokens: int = 0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine: steps until min_lr (0: train.steps); wsd: length of the decay
    impl: Literal["auto", "fused", "foreach", "loop"] = "auto"


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1
    seq_len: int = 64  # with seq_len_schedule: its longest length (evaluation and the memory plan use it)
    # progressive sequence length: [[step, length], ...], from `step` on windows of `length`; first step 0
    seq_len_schedule: tuple[tuple[int, int], ...] = ()
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # auto: bf16 where computed natively (core.speed)
    compile: bool | Literal["auto"] = False  # auto: regional compilation of long one-process runs
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops

    def seq_len_at(self, step: int) -> int:
        """The window length of the step after `step` completed steps (`seq_len` without a schedule)."""
        length = self.seq_len
        for start, phase_length in self.seq_len_schedule:
            if start > step:
                break
            length = phase_length
        return length

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Every window length the run trains on, in schedule order."""
        return tuple(length for _, length in self.seq_len_schedule) or (self.seq_len,)


@dataclass(frozen=True)
class EvalConfig:
    every: int = 250  # 0: only at the end
    batches: int = 20


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # 0: only at the end
    keep_last: int = 2
    resume: str = ""  # "", "auto" (newest complete checkpoint in run_dir) or a checkpoint path
    overwrite: bool = False  # a fresh run into a run_dir that holds checkpoints replaces them (else refused)
    async_save: bool = False  # sharded runs: write shards in the background while training goes on


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float = 0.0  # device peak for MFU; 0: known GPUs only, MFU omitted elsewhere
    gpu_telemetry: bool = True  # NVML utilisation, memory, power, temperature, clocks (CUDA runs)


KernelBackend = Literal["auto", "torch", "triton", "flash_attn"]
KernelOverride = Literal["", "auto", "torch", "triton", "flash_attn"]


@dataclass(frozen=True)
class KernelsConfig:
    backend: KernelBackend = "auto"  # auto: Triton on CUDA, torch elsewhere
    attention: KernelOverride = ""  # "": follow `backend`
    layer_norm: KernelOverride = ""
    rms_norm: KernelOverride = ""
    cross_entropy: KernelOverride = ""
    linear_cross_entropy: KernelOverride = ""
    rope: KernelOverride = ""
    swiglu: KernelOverride = ""

    def overrides(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "backend" and v}


@dataclass(frozen=True)
class ParallelConfig:
    """Layout of the world: dp_replicate x dp_shard x tp ranks (torchtitan's naming).

    dp_shard > 1 shards with FSDP2 (HSDP when dp_replicate > 1 too); dp_replicate > 1 alone
    is DDP. -1 for dp_shard means "the ranks left over". Read by tessera.distributed only.
    """

    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sequence_parallel: bool = True  # with tp > 1: shard norms and dropout along the sequence
    loss_parallel: bool = True  # with tp > 1: vocab-parallel LM head and loss
    mixed_precision: Literal["none", "bf16"] = "none"  # FSDP2: bf16 params, fp32 gradient reduction
    reshard_after_forward: bool = True
    activation_checkpoint: Literal["none", "full", "selective", "op"] = "none"
    checkpoint_every: int = 2  # selective: every k-th block
    zero_stage: Literal[1, 2, 3] = 2  # deepspeed engine
    # optimizer state and step in host memory: ZeRO-Offload (deepspeed) or FSDP2's CPUOffloadPolicy
    offload_optimizer: Literal["none", "cpu"] = "none"


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters for fine-tuning (`core.lora`: the text stages, and `tessera vlm` stage
    "instruct" on its LM); r = 0 trains every weight."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "gate", "up", "down")  # linear layers by name


@dataclass(frozen=True)
class AlignConfig:
    """The alignment stages (read by tessera.alignment); data.path is their JSONL file."""

    val_path: str = ""  # held-out JSONL of the same kind
    beta: float = 0.1  # DPO: strength of the pull towards the reference
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # DPO: > 0 is conservative DPO
    reference: Literal["precompute", "model"] = "precompute"  # DPO: log-probs in one pass, or a frozen model
    # IPO on summed response log-probs (Tessera, the paper's formula) or on their per-token means
    # (TRL's choice): the two need different betas; true takes beta values from TRL
    ipo_length_normalize: bool = False

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"align.beta={self.beta} must be > 0: 0 trains a constant loss (IPO divides by it) "
                              "and a negative beta prefers the rejected response")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"align.label_smoothing={self.label_smoothing} must be in [0, 0.5): the probability "
                              "that a preference label is flipped (0.5 cancels the loss)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError(f"align.label_smoothing={self.label_smoothing} applies to align.loss='sigmoid' only; "
                              "with 'ipo' set it to 0")


@dataclass(frozen=True)
class RLConfig:
    """PPO and GRPO (read by tessera.alignment); data.path is a JSONL of {"prompt": ...} lines, train.steps
    the rollout batches. The reward: a reward model (`tessera rm` checkpoint) or a Python function."""

    reward_model: str = ""  # a checkpoint (or run directory) written by `tessera rm`
    reward_fn: str = ""  # "module:function", called as function(prompt_tokens, response_tokens) -> float
    chat_template: bool = True  # prompts rendered as a user turn (as `tessera rm` saw them); false: raw text
    rollout_batch: int = 16  # prompts per step over all ranks
    mini_batch_size: int = 0  # rows per optimizer step over all ranks; 0: the whole rollout batch
    epochs: int = 2  # passes over every rollout batch (PPO epochs, GRPO's mu)
    group_size: int = 4  # GRPO: samples per prompt
    clip: float = 0.2
    value_clip: float = 0.2  # PPO
    kl_coef: float = 0.05  # PPO: initial per-token penalty; GRPO: weight of the k3 term
    kl_target: float = 0.0  # PPO: per-response KL the adaptive controller aims at; 0: fixed coefficient
    kl_horizon: int = 10000  # PPO: samples over which the controller closes the gap
    gamma: float = 1.0  # PPO
    lam: float = 0.95  # PPO
    vf_coef: float = 0.1  # PPO
    whiten_advantages: bool = True  # PPO
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed_per_prompt: bool = False  # rollouts the same on any number of ranks (slower: a generation call per prompt)

    def __post_init__(self):
        for key in ("rollout_batch", "epochs", "max_new_tokens", "kl_horizon", "group_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rl.{key}={getattr(self, key)} must be >= 1")
        if self.clip <= 0 or self.value_clip <= 0 or self.temperature <= 0:
            raise ConfigError(f"rl.clip={self.clip}, rl.value_clip={self.value_clip} and "
                              f"rl.temperature={self.temperature} must be > 0")
        if self.kl_coef < 0 or self.kl_target < 0 or self.mini_batch_size < 0 or self.vf_coef < 0:
            raise ConfigError(f"rl.kl_coef={self.kl_coef}, rl.kl_target={self.kl_target}, rl.vf_coef={self.vf_coef} "
                              f"and rl.mini_batch_size={self.mini_batch_size} must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"rl.gamma={self.gamma} and rl.lam={self.lam} must be in [0, 1]")

    def rows(self, grouped: bool) -> int:
        """Rows of one rollout batch over all ranks: a response per prompt, or `group_size` (GRPO)."""
        return self.rollout_batch * (self.group_size if grouped else 1)

    def mini_batch(self, grouped: bool) -> int:
        """Rows per optimizer step over all ranks (`mini_batch_size`, 0: the whole batch), checked to
        divide the batch."""
        rows = self.rows(grouped)
        mini = self.mini_batch_size or rows
        if rows % mini:
            group = f" x rl.group_size={self.group_size}" if grouped else ""
            raise ConfigError(f"rl.mini_batch_size={mini} must split a rollout batch evenly: it must divide its "
                              f"{rows} rows (rl.rollout_batch={self.rollout_batch}{group})")
        return mini


@dataclass(frozen=True)
class VisionConfig:
    """A ViT image encoder (read by tessera.multimodal): patches of `patch_size` pixels, pre-norm
    blocks of the text model's kernels without the causal mask, a pooled feature per image."""

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_ff: int = 0  # 0: 4*d_model
    norm_eps: float = 1e-5
    activation: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    pool: Literal["cls", "mean", "map"] = "cls"  # class token, mean of patches, attention-pooling head (SigLIP)
    pre_norm: bool = False  # a LayerNorm on the embeddings before the blocks (CLIP)
    final_norm: Literal["tokens", "pooled"] = "tokens"  # "pooled": only the pooled feature is normed (CLIP)
    patch_bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation of pixels in [0, 1]
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    init_from: str = ""  # "hf:DIR": a Hugging Face CLIP or SigLIP vision tower, architecture and weights

    def __post_init__(self):
        for key in ("image_size", "patch_size", "channels", "n_layers", "n_heads", "d_model"):
            if getattr(self, key) < 1:
                raise ConfigError(f"vision.{key}={getattr(self, key)} must be >= 1")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size={self.image_size} must be divisible by "
                              f"vision.patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"vision.d_model={self.d_model} must be divisible by vision.n_heads={self.n_heads}")
        if self.d_ff < 0 or not self.norm_eps > 0 or not 0 <= self.dropout < 1 or min(self.image_std) <= 0:
            raise ConfigError(f"vision.d_ff={self.d_ff} must be >= 0, vision.norm_eps={self.norm_eps} > 0, "
                              f"vision.dropout={self.dropout} in [0, 1), vision.image_std={list(self.image_std)} > 0")
        if self.pool == "map" and self.final_norm == "pooled":
            raise ConfigError("vision.pool='map' pools the normed tokens: set vision.final_norm='tokens'")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Patches, plus the class token with pool = "cls"."""
        return self.num_patches + (self.pool == "cls")

    def block_config(self) -> ModelConfig:
        """The text model's config that builds blocks of this encoder's width (LayerNorm, biases, GELU
        MLP): what the encoder is built of, and what the planner counts it as."""
        return ModelConfig(n_layers=self.n_layers, n_heads=self.n_heads, d_model=self.d_model, d_ff=self.d_ff,
                           max_seq_len=self.num_tokens, norm="layernorm", norm_eps=self.norm_eps, bias=True,
                           mlp="gelu", dropout=self.dropout, init_std=self.init_std)


@dataclass(frozen=True)
class ClipConfig:
    """Contrastive image-text pretraining (`tessera clip`, read by tessera.multimodal). data.path is
    image shards of `tessera data prepare-images` or a folder of images with a captions.jsonl;
    data.tokenizer the text tower's tokenizer."""

    embed_dim: int = 64  # the shared embedding space of both towers
    temperature: float = 0.07  # initial; the logit scale 1/temperature is learned
    max_logit_scale: float = 100.0
    val_path: str = ""  # held-out folder of the same kind (retrieval and zero-shot accuracy at evaluation)
    prompt: str = "a photo of a {label}"  # zero-shot class prompt, for records with a "label"
    negatives: int = 0  # hard-negative captions per image, from its row's "negatives" (NegCLIP); 0: none

    def __post_init__(self):
        if self.negatives < 0:
            raise ConfigError(f"clip.negatives={self.negatives} must be >= 0 (hard-negative captions per image)")
        if self.embed_dim < 1 or not 0 < self.temperature or not self.max_logit_scale >= 1 / self.temperature:
            raise ConfigError(f"clip.embed_dim={self.embed_dim} must be >= 1, clip.temperature={self.temperature} > 0 "
                              f"and clip.max_logit_scale={self.max_logit_scale} >= 1/temperature")
        if "{label}" not in self.prompt:
            raise ConfigError(f"clip.prompt={self.prompt!r} must contain {{label}}")


VLM_PARTS = ("vision", "projector", "cross", "lm")


@dataclass(frozen=True)
class VLMConfig:
    """An image-conditioned LM (`tessera vlm`, read by tessera.multimodal): the [vision] encoder's
    tokens, mapped by a 2-layer MLP projector to the LM's width, either stand where an `<image>`
    marker stands in the prompt (prefix) or are read by gated cross-attention layers inserted
    before every `cross_every`-th decoder block. data.path: image shards of `tessera data
    prepare-images` (captions for stage "align", question/answer pairs for stage "instruct")."""

    fusion: Literal["prefix", "cross_attention"] = "prefix"
    stage: Literal["align", "instruct"] = "align"
    projector_hidden: int = 0  # the projector's hidden width; 0: the LM's d_model
    cross_every: int = 2  # cross_attention: a gated layer before blocks 0, k, 2k, ...
    freeze: tuple[str, ...] = ()  # parts kept fixed; (): the stage's rule (align: vision, lm; instruct: vision); ["none"]: train all
    vision_from: str = ""  # a `tessera clip` checkpoint whose vision tower is loaded
    init_from: str = ""  # a `tessera vlm` checkpoint: every part (stage "instruct" starts from stage "align")
    prompt: str = "<image>\n{text}"  # the prompt of a question ({text}); the answer follows it
    caption_prompt: str = "<image>"  # the prompt of a caption

    def __post_init__(self):
        if self.projector_hidden < 0 or self.cross_every < 1:
            raise ConfigError(f"vlm.projector_hidden={self.projector_hidden} must be >= 0 and "
                              f"vlm.cross_every={self.cross_every} >= 1")
        unknown = [p for p in self.freeze if p not in VLM_PARTS]
        if unknown and list(self.freeze) != ["none"]:
            raise ConfigError(f"vlm.freeze={list(self.freeze)}: {unknown[0]!r} is no part; valid: "
                              f"{', '.join(VLM_PARTS)}, or ['none'] alone")
        if "{text}" not in self.prompt:
            raise ConfigError(f"vlm.prompt={self.prompt!r} must contain {{text}} (the question)")
        if not set(VLM_PARTS) - set(self.frozen_parts) - ({"cross"} if self.fusion == "prefix" else set()):
            raise ConfigError(f"vlm.freeze={list(self.frozen_parts)} leaves nothing to train")

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        if self.freeze:
            return () if list(self.freeze) == ["none"] else self.freeze
        return ("vision", "lm") if self.stage == "align" else ("vision",)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _check_value(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}={value!r} must be a list")
            return tuple(_check_value(key, v, args[0]) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_check_value(key, v, a) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config annotation {annotation!r} of {key} is not supported")
    raise ConfigError(f"{key}={value!r} must be of type {annotation.__name__}")


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """An instance of the dataclass `cls` from `values`, every key and type checked."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"[{prefix}]" if prefix else "top level"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; valid: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(values[name], dict):
                raise ConfigError(f"{key} must be a section, got {values[name]!r}")
            kwargs[name] = build_section(hints[name], values[name], key)
        else:
            kwargs[name] = _check_value(key, values[name], hints[name])
    return cls(**kwargs)


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--optim.lr=3e-4` -> (["optim", "lr"], 3e-4); values are read as TOML, else as strings."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, raw = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def merge(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, sections merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a TOML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None


def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.toml"))


def _apply_preset(model: dict) -> dict:
    name = model.get("preset", "")
    if not name:
        return model
    path = CONFIG_DIR / "models" / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"model.preset={name!r} is not valid; valid: {', '.join(model_presets())}")
    return merge(read_toml(path).get("model", {}), model)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from a TOML file (or defaults) and command-line overrides.

    A `--model.preset` on the command line replaces the file's whole [model] section (the preset,
    then the command line's other model keys), so a preset never silently mixes with a recipe's
    model; the dropped keys are named on stderr."""
    raw = read_toml(Path(path)) if path else {}
    patches = []
    for arg in overrides:
        keys, value = parse_override(arg)
        patch: dict = value
        for k in reversed(keys):
            patch = {k: patch}
        patches.append(patch)
    cli_preset = any(isinstance(p.get("model"), dict) and "preset" in p["model"] for p in patches)
    if cli_preset and isinstance(raw.get("model"), dict):
        dropped = sorted(k for k in raw.pop("model") if k != "preset")
        if dropped:
            print(f"tessera: --model.preset replaces the model keys of {path}: {', '.join(dropped)}", file=sys.stderr)
    for patch in patches:
        raw = merge(raw, patch)
    if not isinstance(raw.get("model", {}), dict):
        raise ConfigError(f"model must be a section ([model] with keys), got {raw['model']!r}")
    raw["model"] = _apply_preset(raw.get("model", {}))
    cfg = build_section(Config, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject combinations that cannot run, each with the keys involved and what would be valid."""
    m, t = cfg.model, cfg.train
    positive = {
        "model.n_layers": m.n_layers, "model.n_heads": m.n_heads, "model.d_model": m.d_model,
        "model.max_seq_len": m.max_seq_len, "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum, "train.seq_len": t.seq_len, "eval.batches": cfg.eval.batches,
        "log.every": cfg.log.every, "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    o = cfg.optim
    at_least_zero = {
        "model.d_ff": m.d_ff, "optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip, "optim.warmup_steps": o.warmup_steps, "optim.decay_steps": o.decay_steps,
        "eval.every": cfg.eval.every, "checkpoint.every": cfg.checkpoint.every,
        "data.shuffle_buffer": cfg.data.shuffle_buffer, "log.peak_tflops": cfg.log.peak_tflops,
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0" + (" (0: off)" if key.endswith(".every") else ""))
    for key, value in {"model.ffn_multiple_of": m.ffn_multiple_of, "train.max_bad_steps": t.max_bad_steps,
                       "optim.eps": o.eps, "model.norm_eps": m.norm_eps,
                       "model.rope_theta": m.rope_theta}.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must each be in [0, 1)")
    if m.d_model % m.n_heads and not m.attn_head_dim:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} "
                          "(or set model.attn_head_dim)")
    _validate_attention_extras(m)
    if m.n_kv_heads < 0 or m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.pos == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.pos='rope' needs an even head dim; got {m.head_dim} "
                          "(d_model/n_heads, or attn_head_dim when set)")
    if t.seq_len > m.max_seq_len and not m.init_from:  # with init_from, checked once the source's size is known
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check_seq_len_schedule(t, m)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}")
    p = cfg.parallel
    if p.dp_replicate < 1 or p.tp < 1 or p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallel.dp_replicate={p.dp_replicate}, parallel.dp_shard={p.dp_shard}, "
                          f"parallel.tp={p.tp}: each must be >= 1 (dp_shard may be -1: the ranks left over)")
    if p.checkpoint_every < 1:
        raise ConfigError(f"parallel.checkpoint_every={p.checkpoint_every} must be >= 1")
    _check_max_tokens(cfg)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")


def _validate_attention_extras(m: ModelConfig) -> None:
    """Head width, sliding window and RoPE scaling: the knobs Mistral, Qwen2 and Llama 3.1 need."""
    for key, value in {"model.attn_head_dim": m.attn_head_dim, "model.sliding_window": m.sliding_window,
                       "model.window_from_layer": m.window_from_layer,
                       "model.rope_original_max_seq_len": m.rope_original_max_seq_len}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0 (0: off)")
    if m.window_from_layer and not m.sliding_window:
        raise ConfigError(f"model.window_from_layer={m.window_from_layer} needs model.sliding_window > 0")
    if m.rope_scaling == "none":
        return
    if m.pos != "rope":
        raise ConfigError(f"model.rope_scaling={m.rope_scaling!r} needs model.pos='rope'; valid with pos="
                          f"{m.pos!r}: none")
    if not m.rope_factor >= 1.0:
        raise ConfigError(f"model.rope_factor={m.rope_factor} must be >= 1 (how much longer the context gets)")
    if m.rope_scaling in ("llama3", "yarn") and not m.rope_original_max_seq_len:
        raise ConfigError(f"model.rope_scaling={m.rope_scaling!r} needs model.rope_original_max_seq_len > 0")
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor}, rope_high_freq_factor="
                          f"{m.rope_high_freq_factor}: need 0 < low < high")
    if m.rope_scaling == "yarn" and not (0 < m.rope_beta_slow <= m.rope_beta_fast and m.rope_attention_factor >= 0):
        raise ConfigError(f"model.rope_beta_slow={m.rope_beta_slow}, rope_beta_fast={m.rope_beta_fast}, "
                          f"rope_attention_factor={m.rope_attention_factor}: need 0 < slow <= fast, factor >= 0")


def _check_max_tokens(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if d.max_tokens < 0:
        raise ConfigError(f"data.max_tokens={d.max_tokens} must be >= 0 (0: off)")
    if d.max_tokens and t.batch_size != 1:
        raise ConfigError(f"data.max_tokens={d.max_tokens} makes each micro-batch one packed row of at most that many "
                          f"tokens: set train.batch_size=1 (got {t.batch_size}); train.grad_accum adds rows to a step")
    if d.max_tokens and d.max_tokens < t.seq_len:
        raise ConfigError(f"data.max_tokens={d.max_tokens} is below train.seq_len={t.seq_len}, the longest sample: "
                          f"a micro-batch must hold one; valid: >= {t.seq_len}")


def _check_seq_len_schedule(t: TrainConfig, m: ModelConfig) -> None:
    """[[0, L0], [s1, L1], ...]: steps from 0, increasing; lengths positive and within the model's context,
    the longest equal to train.seq_len (the length evaluation and the memory plan use)."""
    schedule = t.seq_len_schedule
    if not schedule:
        return
    steps = [s for s, _ in schedule]
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"train.seq_len_schedule={[list(p) for p in schedule]}: the steps must start at 0 and "
                          "increase, e.g. [[0, 128], [1000, 256], [3000, 512]]")
    bad = [length for _, length in schedule if length < 1 or (length > m.max_seq_len and not m.init_from)]
    if bad:
        raise ConfigError(f"train.seq_len_schedule length {bad[0]} is not valid: each length must be in "
                          f"[1, model.max_seq_len={m.max_seq_len}]")
    if max(t.seq_lens) != t.seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} must equal the longest length of train.seq_len_schedule "
                          f"({max(t.seq_lens)}): evaluation and the memory plan use it")


SCHEDULE_KEYS = ("train.steps", "train.batch_size", "train.grad_accum", "train.seq_len", "train.seq_len_schedule",
                 "optim.lr", "optim.min_lr", "optim.schedule", "optim.warmup_steps", "optim.decay_steps")


def schedule_changes(saved_toml: str, cfg: Config) -> list[str]:
    """`key old -> new` for every schedule key that differs between a saved run config and `cfg`."""
    saved = tomllib.loads(saved_toml)
    now = to_dict(cfg)
    changes = []
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        old = saved.get(section, {}).get(name)
        if old is not None and old != _as_lists(now[section][name]):
            changes.append(f"{key} {old} -> {now[section][name]}")
    return changes


def _as_lists(value: Any) -> Any:
    """Tuples as TOML reads them back: lists."""
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, written into every run directory."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's string escapes are TOML's (newlines included)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
