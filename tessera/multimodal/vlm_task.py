"""`tessera vlm`: the image-conditioned LM's two stages as one trainer task (the `seams.Task`
protocol), run by the one `build_trainer` and `Trainer.fit`.

Stage "align" trains the projector (and cross-attention layers) on captions with the vision
tower and the LM frozen; stage "instruct" also trains the LM, on question/answer pairs, the loss on
the answers only. data.path holds `tessera data prepare-images` shards; its "val" split, when
there is one, is the validation set. Where the weights come from: model.init_from (the LM),
vision.init_from ("hf:DIR") or vlm.vision_from (a `tessera clip` checkpoint) for the vision tower,
vlm.init_from (a `tessera vlm` checkpoint, every part) for stage 2.

With lora.r > 0 (stage "instruct" only: "align" keeps the LM frozen) the LM is tuned through
adapters on its `lora.targets` layers (`core.lora`), its base weights frozen; the projector and
cross-attention layers train and the vision tower stays frozen unless vlm.freeze says otherwise.
Checkpoints hold every part with the adapters; at the end `tessera vlm` exports them as
adapter/ (the LM's adapters) and merged/ (a plain VLM checkpoint), as the text stages do.

Layouts: whatever `tessera.distributed` applies to the decoder, from outside. DDP and FSDP2
shard the LM's blocks and put the vision tower, projector and cross-attention layers in the root's
unit. Tensor parallelism splits the decoder only: the vision tower, projector and cross-attention
layers stay replicated on the TP group (their gradients alike on its ranks, reduced over data
parallelism). The image tokens are spliced into the embeddings before the decoder, so sequence
parallelism shards them with the text where it shards any embeddings (batches are padded to a
multiple of tp for it); the cross-attention layers get the whole sequence gathered. DeepSpeed
ZeRO 1/2/3 and activation checkpointing of the decoder's blocks work as for the text stages.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from tessera.core.checkpoint import find_checkpoint, load_weights
from tessera.core.config import Config, ConfigError
from tessera.core.lora import apply_lora
from tessera.core.seams import InitWeights, Placement
from tessera.core.task import BaseTask
from tessera.core.tokenizer import load_tokenizer
from tessera.multimodal.hf_vision import load_vision_weights
from tessera.multimodal.image_loader import ImageTextLoader
from tessera.multimodal.image_shards import read_image_manifest
from tessera.multimodal.images import ImageTransform
from tessera.multimodal.text_tokens import PromptAnswerTokens
from tessera.multimodal.vlm import VLM, set_trainable, vlm_objective


def image_transform(cfg: Config) -> ImageTransform:
    """The vision tower's input: its size, its normalisation."""
    v = cfg.vision
    return ImageTransform(size=v.image_size, mean=v.image_mean, std=v.image_std, crop=True)


def image_tokens(cfg: Config) -> int:
    return cfg.vision.num_tokens if cfg.vlm.fusion == "prefix" else 0


def load_clip_vision(model: VLM, ckpt: str) -> None:
    """The vision tower of a one-process `tessera clip` checkpoint."""
    try:
        path = find_checkpoint(ckpt) / "model.safetensors"
        state = {k[len("vision."):]: v for k, v in load_file(str(path)).items() if k.startswith("vision.")}
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"vlm.vision_from={ckpt!r}: {e} (a one-process tessera clip checkpoint)") from None
    if not state:
        raise ConfigError(f"vlm.vision_from={ckpt!r} holds no vision tower (vision.* weights)")
    try:
        model.vision.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"vlm.vision_from={ckpt!r} does not fit [vision]: "
                          f"{str(e).splitlines()[1].strip()}; set [vision] as in the clip run") from None


class VLMTask(BaseTask):
    baseline_eval = True  # the validation loss before training: what the stage improves on
    objective = staticmethod(vlm_objective)

    def __init__(self, cfg: Config):
        super().__init__()
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer must name the LM's tokenizer.json")
        if not cfg.data.path:
            raise ConfigError("data.path must name image shards made by `tessera data prepare-images`")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.manifest = read_image_manifest(cfg.data.path)
        tokenizer_dir = Path(cfg.data.tokenizer).parent
        self.tokenizer_files = tuple(p for p in (Path(cfg.data.tokenizer), tokenizer_dir / "tokenizer_config.json")
                                     if p.exists())

    def check(self, cfg: Config, placement: Placement) -> None:
        if cfg.lora.r > 0 and "lm" in cfg.vlm.frozen_parts:
            raise ConfigError(f"lora.r={cfg.lora.r} puts adapters on the LM, which this run keeps frozen (vlm.stage="
                              f"{cfg.vlm.stage!r}, frozen: {', '.join(cfg.vlm.frozen_parts)}); LoRA needs vlm.stage = "
                              "'instruct' without 'lm' in vlm.freeze, or set lora.r = 0")
        if cfg.vision.init_from and cfg.vlm.vision_from:
            raise ConfigError("vision.init_from and vlm.vision_from both name a vision tower: keep one")
        if cfg.vlm.fusion == "cross_attention" and cfg.vlm.cross_every > cfg.model.n_layers:
            raise ConfigError(f"vlm.cross_every={cfg.vlm.cross_every} exceeds model.n_layers={cfg.model.n_layers}")
        if image_tokens(cfg) + 1 >= cfg.train.seq_len:
            raise ConfigError(f"train.seq_len={cfg.train.seq_len} leaves no room for text after an image's "
                              f"{image_tokens(cfg)} tokens")

    def build_model(self, cfg: Config, device: torch.device, init_weights: InitWeights | None) -> nn.Module:
        model = VLM(cfg.vision, cfg.model, cfg.vlm)
        if init_weights is not None:  # model.init_from: the LM
            init_weights(model.lm)
        if cfg.vision.init_from:
            load_vision_weights(model.vision)
        if cfg.vlm.vision_from:
            load_clip_vision(model, cfg.vlm.vision_from)
        if cfg.vlm.init_from:
            try:
                load_weights(model, find_checkpoint(cfg.vlm.init_from))
            except (FileNotFoundError, RuntimeError, ValueError) as e:
                raise ConfigError(f"vlm.init_from={cfg.vlm.init_from!r}: {str(e).splitlines()[0]}") from None
        set_trainable(model, cfg.vlm.frozen_parts)
        if cfg.lora.r > 0:  # after the weights: they load into the plain model
            apply_lora(model.lm, cfg.lora)
        return model.to(device)

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        t, v = cfg.train, cfg.vlm
        p = cfg.parallel
        collate = PromptAnswerTokens(self.tokenizer, t.seq_len, v.prompt, v.caption_prompt, image_tokens(cfg),
                                     multiple=p.tp if p.sequence_parallel else 1)
        common = dict(batch_size=t.batch_size, transform=image_transform(cfg), rank=dp_rank, world_size=dp_size,
                      on_error=cfg.data.on_error, text_collate=collate)
        train = ImageTextLoader(self.manifest, "train", num_workers=cfg.data.num_workers, seed=t.seed,
                                shuffle_buffer=cfg.data.shuffle_buffer, **common)
        val = None
        if self.manifest.splits.get("val"):
            val = ImageTextLoader(self.manifest, "val", shuffle=False, epochs=1, **common)
        return train, val
