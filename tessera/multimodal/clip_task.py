"""`tessera clip`: CLIP pretraining as a trainer task (the `seams.Task` protocol), run by the one
`build_trainer` and `Trainer.fit` like every other stage.

Data: a folder with `captions.jsonl` rows {"image": NAME, "caption": TEXT, "label"?: CLASS}, the
image at `images/NAME` (as `tessera data synth-scenes` writes it) or at `NAME`. The pairs are
decoded once into memory by `read_pairs`, a small stand-in until the image shard loader of
`tessera data prepare-images` takes its place: the task only needs an iterable of dict batches
with "pixels" (B, C, H, W) float32, "input_ids" (B, S), "lengths" (B,) and "caption_ids" (B,).

Evaluation scores the whole held-out folder (`clip.val_path`) as one batch per rank: contrastive
loss, image<->text Recall@1/5/10 and, when its rows carry labels, zero-shot accuracy with
`clip.prompt` for each class.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.config import Config, ConfigError
from tessera.core.data.samples import SampleLoader
from tessera.core.seams import InitWeights, Placement
from tessera.core.task import BaseTask
from tessera.core.tokenizer import Tokenizer, load_tokenizer
from tessera.multimodal.clip import CLIP, clip_objective
from tessera.multimodal.hf_vision import load_vision_weights, vision_config_from_hf


def clip_config(cfg: Config) -> Config:
    """`cfg` with the vision tower's architecture taken from `vision.init_from` when it names one."""
    if not cfg.vision.init_from:
        return cfg
    return dataclasses.replace(cfg, vision=vision_config_from_hf(cfg.vision))


def encode_caption(tokenizer: Tokenizer, text: str, seq_len: int) -> tuple[torch.Tensor, int]:
    """(token row of `seq_len` ending the caption with EOS, right-padded; its length)."""
    ids = tokenizer.encode(text)[: seq_len - 1] + [tokenizer.eos_id]
    return torch.tensor(ids + [tokenizer.pad_id] * (seq_len - len(ids))), len(ids)


def read_image(path: Path, cfg) -> torch.Tensor:
    """An RGB image resized to the encoder's size and normalised with its mean and std, (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ConfigError(f"{path} cannot be read as an image: {e}") from None
    pixels = pixels.view(cfg.image_size, cfg.image_size, 3).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cfg.image_mean)[:, None, None], torch.tensor(cfg.image_std)[:, None, None]
    return (pixels - mean) / std


def read_pairs(folder: str, key: str, tokenizer: Tokenizer, cfg: Config) -> tuple[list[dict], list[str]]:
    """(one sample per captions.jsonl row of `folder`, the sorted class labels its rows carry)."""
    path = Path(folder) / "captions.jsonl"
    if not path.is_file():
        raise ConfigError(f"{key}={folder!r} must be a folder with captions.jsonl (and its images)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
                raise ConfigError(f"{path}:{n}: a row must be {{\"image\": NAME, \"caption\": TEXT}}")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    labels = sorted({str(r["label"]) for r in rows}) if all("label" in r for r in rows) else []
    captions = {c: i for i, c in enumerate(sorted({r["caption"] for r in rows}))}
    samples = []
    for row in rows:
        image = Path(folder) / "images" / row["image"]
        ids, length = encode_caption(tokenizer, row["caption"], cfg.train.seq_len)
        sample = {"pixels": read_image(image if image.exists() else Path(folder) / row["image"], cfg.vision),
                  "input_ids": ids, "lengths": torch.tensor(length), "caption_ids": torch.tensor(captions[row["caption"]])}
        if labels:
            sample["labels"] = torch.tensor(labels.index(str(row["label"])))
        samples.append(sample)
    return samples, labels


class CLIPTask(BaseTask):
    val_perplexity = False
    baseline_eval = True  # retrieval at step 0 is chance: the figure the run improves on
    static_shapes = True  # images of one size, captions padded to train.seq_len
    objective = staticmethod(clip_objective)

    def __init__(self, cfg: Config):
        super().__init__()
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer must name the text tower's tokenizer.json")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        tokenizer_dir = Path(cfg.data.tokenizer).parent
        self.tokenizer_files = tuple(p for p in (Path(cfg.data.tokenizer), tokenizer_dir / "tokenizer_config.json")
                                     if p.exists())

    def check(self, cfg: Config, placement: Placement) -> None:
        if cfg.parallel.tp > 1 or cfg.parallel.engine != "fsdp":
            raise ConfigError(f"tessera clip runs on data parallelism (FSDP2/DDP): parallel.tp={cfg.parallel.tp} "
                              f"and parallel.engine={cfg.parallel.engine!r} are not supported; use tp = 1, engine = 'fsdp'")
        if cfg.lora.r > 0:
            raise ConfigError(f"lora.r={cfg.lora.r}: tessera clip trains every weight; set lora.r = 0")

    def build_model(self, cfg: Config, device: torch.device, init_weights: InitWeights | None) -> nn.Module:
        model = CLIP(cfg.vision, cfg.model, cfg.clip)
        if init_weights is not None:  # model.init_from: the text tower
            init_weights(model.text)
        if cfg.vision.init_from:
            load_vision_weights(model.vision)
        return model.to(device)

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        train, _ = read_pairs(cfg.data.path, "data.path", self.tokenizer, cfg)
        loader = SampleLoader(train, stack, cfg.train.batch_size, dp_rank, dp_size, seed=cfg.train.seed)
        if not cfg.clip.val_path:
            return loader, None
        val, labels = read_pairs(cfg.clip.val_path, "clip.val_path", self.tokenizer, cfg)
        rows = len(val) // dp_size
        if rows == 0:
            raise ConfigError(f"clip.val_path holds {len(val)} pairs: fewer than the {dp_size} data-parallel ranks")
        classes = [encode_caption(self.tokenizer, cfg.clip.prompt.format(label=c), cfg.train.seq_len) for c in labels]

        def with_classes(samples: list[dict]) -> dict:
            batch = stack(samples)
            if classes:
                batch["class_ids"] = torch.stack([ids for ids, _ in classes])
                batch["class_lengths"] = torch.tensor([n for _, n in classes])
            return batch

        return loader, SampleLoader(val, with_classes, rows, dp_rank, dp_size, shuffle=False, epochs=1)


def stack(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
