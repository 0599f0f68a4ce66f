"""Generation from an image-conditioned LM checkpoint, through `core.generate` and its KV cache.

`ImagePrompted` makes a `VLM` with its images look like the decoder `core.generate` drives: the
first call (the prompt) places the image tokens where the prompt's `<image>` markers expanded to;
later calls (one new token each, cached) are text only, except that cross-attention layers read
the images at every step. Prompts with images must fit the context window with their answer: a
window that slid past the image would lose it, so generation ends where the context does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.checkpoint import find_checkpoint, load_weights, read_model_config
from tessera.core.config import Config, ConfigError, LoraConfig, load_config, to_toml
from tessera.core.generate import Sampling, generate
from tessera.core.lora import export_from_checkpoint
from tessera.core.tokenizer import Tokenizer
from tessera.multimodal.images import MAX_PIXELS, decode_rgb
from tessera.multimodal.text_tokens import IMAGE_MARKER, encode_with_images
from tessera.multimodal.vlm import VLM
from tessera.multimodal.vlm_task import image_transform


def is_vlm_checkpoint(ckpt: str | Path) -> bool:
    """Whether the checkpoint was written by `tessera vlm` (its run config says so)."""
    run_config = Path(ckpt) / "run_config.toml"
    return run_config.exists() and "[vlm]" in run_config.read_text() and _has_projector(Path(ckpt))


def _has_projector(ckpt: Path) -> bool:
    if (ckpt / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            return any(k.startswith("projector.") for k in f.keys())
    return (ckpt / ".metadata").exists()


def load_vlm(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[VLM, Config]:
    """The image-conditioned LM of a `tessera vlm` checkpoint (every part) and its run config."""
    ckpt = find_checkpoint(ckpt)
    if not is_vlm_checkpoint(ckpt):
        raise ConfigError(f"{ckpt} is not a tessera vlm checkpoint (no vision tower and projector): "
                          "--image needs one")
    cfg = load_config(ckpt / "run_config.toml")
    model = VLM(cfg.vision, read_model_config(ckpt), cfg.vlm).to(device)
    load_weights(model, ckpt)  # a LoRA run's own checkpoint is refused: its merged/ export is read
    return model.eval(), cfg


def export_lora(ckpt: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """A LoRA run's checkpoint (any layout) -> `out_dir/adapter` (the LM's adapters, under the
    decoder's own names) and `out_dir/merged` (every part, the adapters folded into the LM, its run
    config with lora.r = 0): as for the text stages, the merged checkpoint is what generate, eval,
    serve and vlm.init_from read."""
    cfg = load_config(Path(ckpt) / "run_config.toml")
    model = VLM(cfg.vision, read_model_config(ckpt), cfg.vlm)
    return export_from_checkpoint(ckpt, cfg.lora, out_dir, model, model.lm,
                                  to_toml(dataclasses.replace(cfg, lora=LoraConfig())))


def image_pixels(data: bytes, where: str, cfg: Config, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """One encoded image (PNG, JPEG, ...) as the vision tower's input (C, H, W); ImageError if unusable."""
    return image_transform(cfg)(decode_rgb(data, where, max_pixels))


class ImagePrompted(nn.Module):
    """A VLM with its prompts' images, called the way `core.generate` calls a decoder."""

    def __init__(self, model: VLM, images: torch.Tensor, image_mask: torch.Tensor):
        super().__init__()
        self.model, self.images, self.image_mask = model, images, image_mask
        self.layers = model.lm.layers  # generate sizes its cache from the first block's heads

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, idx, positions=None, key_padding_mask=None, cache=None):
        start = cache.length if cache is not None else 0
        if self.model.fusion == "cross_attention":
            return self.model(idx, images=self.images, positions=positions, key_padding_mask=key_padding_mask, cache=cache)
        prompt = self.image_mask.shape[1]
        if start:  # a cached step: text only
            return self.model(idx, positions=positions, key_padding_mask=key_padding_mask, cache=cache)
        mask = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        mask[:, :prompt] = self.image_mask
        return self.model(idx, image_mask=mask, images=self.images, positions=positions,
                          key_padding_mask=key_padding_mask, cache=cache)


@torch.no_grad()
def generate_with_images(model: VLM, tokenizer: Tokenizer, prompts: Sequence[str], pixels: Sequence[torch.Tensor],
                         max_new_tokens: int, sampling: Sampling = Sampling(temperature=0), use_cache: bool = True,
                         seed: int | None = None):
    """Per decoding step, the new token of every prompt (None once it stopped); `pixels[i]` holds
    the (N_i, C, H, W) images of prompt i, one per `<image>` marker, in order."""
    rows = [encode_with_images(tokenizer, p, len(x), model.image_tokens) for p, x in zip(prompts, pixels, strict=True)]
    longest = max(len(ids) for ids, _ in rows)
    if longest >= model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} positions (images included) fills the model's context of "
                         f"{model.cfg.max_seq_len}")
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - longest)  # generation ends with the context
    device = next(model.parameters()).device
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, (_, flags) in enumerate(rows):  # left-padded, as generate pads the prompts
        mask[i, longest - len(flags):] = torch.tensor(flags, dtype=torch.bool)
    images = model.encode_images(torch.cat(list(pixels)).to(device))
    wrapped = ImagePrompted(model, images, mask.to(device))
    yield from generate(wrapped, [ids for ids, _ in rows], max_new_tokens, sampling, stop_ids=[tokenizer.eos_id],
                        use_cache=use_cache, pad_id=tokenizer.pad_id, seed=seed)


def answers(model: VLM, tokenizer: Tokenizer, prompts: Sequence[str], pixels: Sequence[torch.Tensor],
            max_new_tokens: int, **kwargs) -> list[str]:
    """The decoded continuation of every prompt, up to its eos."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_with_images(model, tokenizer, prompts, pixels, max_new_tokens, **kwargs):
        for seq, t in zip(outs, step):
            if t is not None and t != tokenizer.eos_id:
                seq.append(t)
    return [tokenizer.decode(seq) for seq in outs]


class PromptEmbedder:
    """For `tessera serve`: a transcript of text and image bytes -> (the prompt's token ids, its input
    embeddings (P, d_model) with each image's projected tokens in place). Prefix fusion only: with
    cross-attention the images are not part of the prompt's embeddings."""

    def __init__(self, model: VLM, cfg: Config, tokenizer: Tokenizer, max_pixels: int = MAX_PIXELS):
        if model.fusion != "prefix":
            raise ConfigError(f"tessera serve takes images for vlm.fusion = 'prefix' models; this one is "
                              f"{model.fusion!r}")
        self.model, self.cfg, self.tokenizer, self.max_pixels = model, cfg, tokenizer, max_pixels

    @torch.no_grad()
    def __call__(self, pieces: list[str | bytes]) -> tuple[list[int], torch.Tensor]:
        images = [p for p in pieces if isinstance(p, bytes)]
        text = "".join(IMAGE_MARKER if isinstance(p, bytes) else p.replace(IMAGE_MARKER, "") for p in pieces)
        ids, flags = encode_with_images(self.tokenizer, text, len(images), self.model.image_tokens)
        device = next(self.model.parameters()).device
        pixels = torch.stack([image_pixels(b, f"image {i + 1}", self.cfg, self.max_pixels) for i, b in enumerate(images)])
        features = self.model.encode_images(pixels.to(device))
        embeds = self.model.lm.tok_emb(torch.tensor(ids, device=device))
        embeds[torch.tensor(flags, device=device)] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return ids, embeds
