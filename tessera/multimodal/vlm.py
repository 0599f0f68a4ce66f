"""An image-conditioned language model, LLaVA-style: a vision encoder, a 2-layer MLP projector to
the LM's width, and the unmodified decoder `core.model.Transformer`.

With fusion "prefix" the projected image tokens take the positions an `<image>` marker expanded to
in the prompt (`image_mask`), through the decoder's `inputs_embeds` path. With "cross_attention"
the text keeps its own positions and gated cross-attention layers (`cross_attention.py`), hooked
in front of every k-th decoder block from outside, read the image tokens; their tanh gates start
at 0, so the LM starts out exactly the LM it was.

Parallelism is applied from outside (`tessera.distributed.parallelize`) and splits only the
decoder under tensor parallelism: the vision tower, projector and cross-attention layers stay
replicated on the TP group. The image tokens are spliced into the embeddings here, before the
decoder, which is where sequence parallelism shards the sequence.

The checkpoint holds every part (`vision.*`, `projector.*`, `cross.*`, `lm.*`); its config.json is
the LM's, its run_config.toml the rest.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.core.config import ModelConfig, VisionConfig, VLMConfig
from tessera.core.model import Transformer
from tessera.multimodal.cross_attention import CrossAttentionHooks, GatedCrossAttention
from tessera.multimodal.vision import VisionTransformer


class Projector(nn.Module):
    """Vision features -> LM embeddings: Linear, GELU, Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VLM(nn.Module):
    def __init__(self, vision: VisionConfig, text: ModelConfig, vlm: VLMConfig):
        super().__init__()
        self.fusion = vlm.fusion
        self.vision = VisionTransformer(vision)
        self.projector = Projector(vision.d_model, vlm.projector_hidden or text.d_model, text.d_model)
        self.lm = Transformer(text)
        at = list(range(0, text.n_layers, vlm.cross_every)) if vlm.fusion == "cross_attention" else []
        self.cross = nn.ModuleList(GatedCrossAttention(text) for _ in at)
        self.hooks = CrossAttentionHooks(self.lm, dict(zip(at, self.cross)))

    @property
    def cfg(self) -> ModelConfig:
        """The LM's config: what a checkpoint's config.json holds."""
        return self.lm.cfg

    @property
    def image_tokens(self) -> int:
        """Positions one `<image>` marker expands to in a prompt (0 with cross-attention)."""
        return self.vision.cfg.num_tokens if self.fusion == "prefix" else 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, T, d_model of the LM): every token of each image's encoder output, projected."""
        return self.projector(self.vision(pixels)[0])

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, images: torch.Tensor | None = None, **lm_kwargs):
        """The LM's loss against `targets` (or its logits) for token rows whose images are `pixels`
        (N, C, H, W) in row order, or already encoded `images` (N, T, d). Prefix: the positions
        flagged in `image_mask` take the image tokens; cross-attention: each row's images are read
        by the gated layers (every row the same number)."""
        if images is None and pixels is not None:
            images = self.encode_images(pixels)
        embeds = self.lm.tok_emb(input_ids)
        if self.fusion == "prefix":
            slots = int(image_mask.sum()) if image_mask is not None else 0
            given = 0 if images is None else images.shape[0] * images.shape[1]
            if slots != given:
                raise ValueError(f"the prompts hold {slots} image positions but {given} image tokens were given "
                                 f"({0 if images is None else images.shape[0]} image(s) of {self.image_tokens}): "
                                 "one <image> marker per image")
            if given:
                embeds = embeds.masked_scatter(image_mask[..., None], images.reshape(-1, images.shape[-1]).to(embeds.dtype))
            return self.lm(None, targets, inputs_embeds=embeds, **lm_kwargs)
        rows = input_ids.shape[0]
        if images is None or images.shape[0] % rows:
            raise ValueError(f"{0 if images is None else images.shape[0]} image(s) for {rows} row(s): "
                             "cross-attention needs the same number of images in every row")
        self.hooks.read(images.reshape(rows, -1, images.shape[-1]))
        return self.lm(None, targets, inputs_embeds=embeds, **lm_kwargs)


def set_trainable(model: VLM, frozen: tuple[str, ...]) -> None:
    """requires_grad off for the parts named in `frozen` (vision, projector, cross, lm), on for the rest."""
    for part in ("vision", "projector", "cross", "lm"):
        for p in getattr(model, part).parameters():
            p.requires_grad_(part not in frozen)


def vlm_objective(model: nn.Module, batch: dict):
    """Next-token loss on the answers (the targets the collate kept), images from `pixel_values`."""
    loss = model(batch["input_ids"], batch["pixel_values"], batch.get("image_mask"), batch["targets"])
    return loss, {}
