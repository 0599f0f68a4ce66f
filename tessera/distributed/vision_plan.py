"""The image side of a plan: the vision tower, projector and cross-attention layers of `tessera vlm`,
or the image tower and projections of `tessera clip`.

tessera.distributed may not import tessera.multimodal, so the parts are counted from their
configs: the core modules they are built of (`Block`, `MLP`, `Norm`) on the meta device, the rest
by formula (tests/test_planner_vision.py checks every count against the real `VLM` and `CLIP`).
Activations are what autograd keeps (measured with saved-tensor hooks): a trained tower's blocks,
its input pixels and norms for micro_batch x images x num_tokens tokens; a frozen tower with
nothing trained below it keeps nothing. The projector keeps its input and both GELU sides; a gated
cross-attention layer keeps what a decoder block keeps, plus one gated output and k/v over the image
tokens instead of the text's, and is recomputed with the block it precedes under checkpointing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tessera.core.config import VLM_PARTS, Config, ModelConfig, VisionConfig
from tessera.distributed.activation_bytes import layer_activation_bytes

FUSIONS = ("prefix", "cross_attention", "clip")


@dataclass(frozen=True)
class Vision:
    """A run's image side: `fusion` prefix or cross_attention (`tessera vlm`), or clip (`tessera clip`)."""

    cfg: VisionConfig
    fusion: str = "prefix"
    images: int = 1  # images per sample
    projector_hidden: int = 0  # vlm: the projector's hidden width; 0: the LM's d_model
    cross_every: int = 2  # cross_attention: a gated layer before blocks 0, k, 2k, ...
    embed_dim: int = 64  # clip: the shared embedding width
    frozen: tuple[str, ...] = ()  # parts without gradients or optimizer state, of vision, projector, cross, lm

    @classmethod
    def of(cls, cfg: Config, command: str) -> Vision | None:
        """The image side of a run of `tessera COMMAND` with `cfg` (None for a text-only command)."""
        if command == "clip":
            return cls(cfg.vision, "clip", embed_dim=cfg.clip.embed_dim)
        if command == "vlm":
            v = cfg.vlm
            return cls(cfg.vision, v.fusion, projector_hidden=v.projector_hidden, cross_every=v.cross_every,
                       frozen=v.frozen_parts)
        return None

    @property
    def prefix_tokens(self) -> int:
        """Decoder positions the images of one sample take."""
        return self.images * self.cfg.num_tokens if self.fusion == "prefix" else 0

    def cross_layers(self, n_layers: int) -> list[int]:
        return list(range(0, n_layers, self.cross_every)) if self.fusion == "cross_attention" else []

    def check(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is not valid; valid: {', '.join(FUSIONS)}")
        if min(self.images, self.cross_every, self.embed_dim) < 1 or self.projector_hidden < 0:
            raise ValueError(f"images={self.images}, cross_every={self.cross_every} and embed_dim={self.embed_dim} "
                             f"must be >= 1 and projector_hidden={self.projector_hidden} >= 0")
        if any(p not in VLM_PARTS for p in self.frozen) or (self.fusion == "clip" and self.frozen):
            raise ValueError(f"frozen={list(self.frozen)}: parts of a VLM are {', '.join(VLM_PARTS)}; CLIP trains all")


@dataclass(frozen=True)
class ImageSide:
    """What the image side adds to one rank of a plan (all zeros: a text model)."""

    params: int = 0  # on every TP rank: the image side is replicated under tensor parallelism
    trained: int = 0  # of those, the ones with gradients and optimizer state
    activations: float = 0.0  # bytes saved by the forward, with the layout's checkpointing
    activations_no_ac: float = 0.0
    flops: float = 0.0  # forward and backward of one micro-batch
    prefix_tokens: int = 0  # decoder positions per sample
    lm_trained: bool = True  # the decoder (CLIP: text tower) has gradients and optimizer state
    lm_loss: bool = True  # False: CLIP's contrastive loss, no vocabulary logits


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=64)
def count_image_params(vision: Vision, text: ModelConfig) -> dict[str, int]:
    """Parameters of each part: the tower ("vision"), "projector" (CLIP: both projections and the
    logit scale) and the cross-attention layers ("cross")."""
    from tessera.core.model import MLP, Block, Norm

    v, d, dt = vision.cfg, vision.cfg.d_model, text.d_model
    blocks = v.block_config()
    with torch.device("meta"):
        block = _numel(Block(blocks, causal=False, activation=v.activation))
        mlp_v, norm_v, mlp_t, norm_t = _numel(MLP(blocks)), _numel(Norm(blocks)), _numel(MLP(text)), _numel(Norm(text))
    patch = v.channels * v.patch_size ** 2 * d + d * v.patch_bias
    head = d + 4 * (d * d + d) + norm_v + mlp_v if v.pool == "map" else 0  # probe, q/k/v/o, norm, MLP
    tower = v.n_layers * block + patch + (v.num_tokens + (v.pool == "cls")) * d + norm_v * (1 + v.pre_norm) + head
    if vision.fusion == "clip":
        projector = (d + dt) * vision.embed_dim + 1
    else:
        h = vision.projector_hidden or dt
        projector = d * h + h + h * dt + dt
    cross = 2 * norm_t + 4 * dt * text.n_heads * text.head_dim + mlp_t + 2  # two norms, q/k/v/o, MLP, two gates
    return {"vision": tower, "projector": projector, "cross": len(vision.cross_layers(text.n_layers)) * cross}


def image_side(vision: Vision, text: ModelConfig, micro_batch: int, seq: int, ac: str, ac_every: int,
               act_b: int) -> ImageSide:
    """One rank's image side for micro-batches of `micro_batch` samples of `seq` decoder positions."""
    vision.check()
    v, frozen, clip = vision.cfg, set(vision.frozen), vision.fusion == "clip"
    n = count_image_params(vision, text)
    images = micro_batch * vision.images
    tokens = images * v.num_tokens
    d, blocks = v.d_model, v.block_config()
    tower_flops = images * v.num_tokens * (6 * n["vision"] + 12 * v.n_layers * d * v.num_tokens)
    tower, flops = 0.0, tower_flops / (3 if "vision" in frozen else 1)  # frozen: the forward only
    if "vision" not in frozen:
        layer = layer_activation_bytes(blocks, tokens, "none", act_b)
        layer += tokens * blocks.ffn_dim * act_b if v.activation == "quick_gelu" else 0  # its sigmoid too
        normed = tokens if v.final_norm == "tokens" else images if clip else 0  # a VLM drops the pooled feature
        pooling = 0  # CLIP reads the pooled feature: a class token's view keeps all normed tokens
        if clip and v.pool == "cls":
            pooling = tokens * d * act_b
        elif clip and v.pool == "map":  # k, v, the normed tokens; the head's rows
            pooling = (3 * tokens * d + images * (2 * blocks.ffn_dim + 3 * d)) * act_b
        tower = (images * v.channels * v.image_size ** 2 * act_b + v.n_layers * layer + pooling
                 + (tokens * v.pre_norm + normed) * (d * act_b + 8))
    if clip:
        projector = images * (d + text.d_model) * act_b
        flops += 6 * n["projector"] * images
    else:
        h = vision.projector_hidden or text.d_model
        projector = tokens * (d + 2 * h) * act_b if {"vision", "projector"} - frozen else 0.0
        flops += n["projector"] * tokens * (6 if "projector" not in frozen else 4 if "vision" not in frozen else 2)
    cross, cross_no_ac = 0.0, 0.0
    at = vision.cross_layers(text.n_layers)
    if at:
        dt, q, kv = text.d_model, text.n_heads * text.head_dim, text.kv_heads * text.head_dim
        text_tokens, keys = micro_batch * seq, vision.images * v.num_tokens
        layer = (layer_activation_bytes(text, text_tokens, "none", act_b) + text_tokens * (dt - 2 * kv) * act_b
                 + tokens * 2 * q * act_b)
        kept = {"none": len(at), "op": len(at), "full": 0, "selective": sum(1 for i in at if i % ac_every)}[ac]
        images_held = tokens * dt * act_b  # the projected tokens every layer reads
        cross, cross_no_ac = kept * layer + images_held, len(at) * layer + images_held
        matmuls = (n["cross"] // len(at) - 2 * dt * q) * text_tokens + 2 * dt * q * tokens
        flops += len(at) * ((6 if "cross" not in frozen else 4) * matmuls + 12 * q * keys * text_tokens)
    return ImageSide(params=sum(n.values()), trained=sum(c for part, c in n.items() if part not in frozen),
                     activations=tower + projector + cross, activations_no_ac=tower + projector + cross_no_ac,
                     flops=flops, prefix_tokens=vision.prefix_tokens, lm_trained="lm" not in frozen, lm_loss=not clip)
