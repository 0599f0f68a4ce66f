"""`tessera clip`: CLIP pretraining as a trainer task (the `seams.Task` protocol), run by the one
`build_trainer` and `Trainer.fit` like every other stage.

Data (`data.path`): image shards of `tessera data prepare-images` (streamed by `ImageTextLoader`,
decoded in its workers), or a folder with `captions.jsonl` rows {"image": NAME, "caption": TEXT,
"label"?: CLASS} and the images under `images/` (as `tessera data synth-scenes` writes it), decoded
once into memory. Both decode with `images.decode_rgb` and the encoder's `ImageTransform` and
tokenize with `CaptionTokens`; a batch is "pixel_values" (B, C, H, W), "input_ids" (B, S),
"lengths" (B,) and "caption_ids" (B,): a hash of the caption, so identical captions count as the
same text in retrieval on every rank.

Evaluation: a held-out folder (`clip.val_path`) is scored as one batch per rank (loss, image<->text
Recall@1/5/10 over all of it and, when every row has a label, zero-shot accuracy with `clip.prompt`
for each class); without one, the shards' val split, with Recall@K within each evaluation batch.

Layouts: one process, DDP, FSDP2 and DeepSpeed ZeRO 1/2/3; not tensor parallelism, since the
contrastive loss gathers its negatives from every rank (`clip.gather_rows`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from tessera.core.config import Config, ConfigError, VisionConfig
from tessera.core.data import DataError
from tessera.core.data.samples import SampleLoader
from tessera.core.seams import InitWeights, Placement
from tessera.core.task import BaseTask
from tessera.core.tokenizer import Tokenizer, load_tokenizer
from tessera.multimodal.clip import CLIP, clip_objective
from tessera.multimodal.hf_vision import load_vision_weights, vision_config_from_hf
from tessera.multimodal.image_loader import ImageTextLoader
from tessera.multimodal.image_shards import MANIFEST, read_image_manifest, row_negatives
from tessera.multimodal.images import ImageTransform, decode_rgb
from tessera.multimodal.text_tokens import CaptionTokens


def clip_config(cfg: Config) -> Config:
    """`cfg` with the vision tower's architecture taken from `vision.init_from` when it names one."""
    if not cfg.vision.init_from:
        return cfg
    return dataclasses.replace(cfg, vision=vision_config_from_hf(cfg.vision))


def image_transform(vision: VisionConfig) -> ImageTransform:
    """The encoder's preprocessing: its size, mean and std (shorter side resized, centre crop)."""
    return ImageTransform(size=vision.image_size, mean=vision.image_mean, std=vision.image_std)


def caption_id(text: str) -> int:
    """The same integer for the same caption in every process (Python's str hash is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


class ClipBatch:
    """A loader batch ("pixel_values", "texts" and, where the data has them, each text's hard-negative
    captions "negatives") as the tensors `clip_objective` reads: with `negatives` > 0, the first that
    many of each row's, in row order, as "negative_input_ids", "negative_lengths" and
    "negative_caption_ids"."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, negatives: int = 0):
        self.tokens, self.negatives = CaptionTokens(tokenizer, seq_len), negatives

    def _texts(self, texts: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        tokens = self.tokens({"texts": texts})
        return {f"{prefix}input_ids": tokens["input_ids"], f"{prefix}lengths": tokens["attention_mask"].sum(dim=1),
                f"{prefix}caption_ids": torch.tensor([caption_id(t) for t in texts])}

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        out = {"pixel_values": batch["pixel_values"], **self._texts(batch["texts"])}
        if self.negatives and "negatives" in batch:
            out.update(self._texts([n for row in batch["negatives"] for n in row[:self.negatives]], "negative_"))
        return out


def read_image(path: Path, transform: ImageTransform) -> torch.Tensor:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read as an image: {e.strerror}") from None
    return transform(decode_rgb(data, str(path)))


def read_pairs(folder: str, key: str, transform: ImageTransform, negatives: int = 0) -> tuple[list[dict], list[str]]:
    """(one sample per captions.jsonl row of `folder`, the sorted class labels its rows carry). With
    `negatives` > 0 every row must list at least that many hard-negative captions ("negatives")."""
    path = Path(folder) / "captions.jsonl"
    if not path.is_file():
        raise ConfigError(f"{key}={folder!r} must be a folder with captions.jsonl (and its images), or "
                          f"image shards of `tessera data prepare-images`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
                raise DataError(f"{path}:{n}: a row must be {{\"image\": NAME, \"caption\": TEXT}}")
            if negatives and len(row_negatives(row, f"{path}:{n}")) < negatives:
                raise DataError(f"{path}:{n}: clip.negatives={negatives} needs a list of at least {negatives} "
                                f"hard-negative captions in \"negatives\" (texts that do not describe the image)")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    labels = sorted({str(r["label"]) for r in rows}) if all("label" in r for r in rows) else []
    samples = []
    for row in rows:
        image = Path(folder) / "images" / row["image"]
        sample = {"pixel_values": read_image(image if image.exists() else Path(folder) / row["image"], transform),
                  "text": row["caption"]}
        if negatives:
            sample["negatives"] = row["negatives"]
        if labels:
            sample["label"] = labels.index(str(row["label"]))
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
        if cfg.parallel.tp > 1:
            raise ConfigError(f"tessera clip runs on data parallelism (FSDP2/DDP, DeepSpeed ZeRO): parallel.tp="
                              f"{cfg.parallel.tp} is not supported (the contrastive loss gathers its negatives from "
                              "every rank, and the ranks of a TP group hold the same rows); use tp = 1")
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
        t, transform = cfg.train, image_transform(cfg.vision)
        to_tensors = ClipBatch(self.tokenizer, t.seq_len, cfg.clip.negatives)

        def collate(samples: list[dict]) -> dict:
            return to_tensors({"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                               "texts": [s["text"] for s in samples],
                               **({"negatives": [s["negatives"] for s in samples]} if "negatives" in samples[0] else {})})

        shards = (Path(cfg.data.path) / MANIFEST).is_file()
        if shards:
            manifest = read_image_manifest(cfg.data.path)
            if manifest.kind != "captions":
                raise ConfigError(f"data.path={cfg.data.path!r} holds {manifest.kind} shards; tessera clip needs captions")
            if cfg.clip.negatives > manifest.negatives:
                raise ConfigError(f"clip.negatives={cfg.clip.negatives}: the captions of data.path={cfg.data.path!r} carry "
                                  f"{manifest.negatives} hard negatives at least (each row's \"negatives\" list when "
                                  "prepared); set clip.negatives <= that")

            def shard_loader(split: str, **kw) -> ImageTextLoader:
                return ImageTextLoader(manifest, split, t.batch_size, transform, dp_rank, dp_size, cfg.data.num_workers,
                                       seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
                                       text_collate=to_tensors, **kw)

            train = shard_loader("train")
        else:
            train = SampleLoader(read_pairs(cfg.data.path, "data.path", transform, cfg.clip.negatives)[0], collate, t.batch_size,
                                 dp_rank, dp_size, seed=t.seed)
        if not cfg.clip.val_path:
            has_val = shards and manifest.samples("val") > 0
            return train, shard_loader("val", shuffle=False, epochs=1) if has_val else None
        val, labels = read_pairs(cfg.clip.val_path, "clip.val_path", transform)
        rows = len(val) // dp_size
        if rows == 0:
            raise ConfigError(f"clip.val_path holds {len(val)} pairs: fewer than the {dp_size} data-parallel ranks")
        classes = CaptionTokens(self.tokenizer, t.seq_len)({"texts": [cfg.clip.prompt.format(label=c) for c in labels]})

        def with_classes(samples: list[dict]) -> dict:
            batch = collate(samples)
            if labels:
                batch.update(class_ids=classes["input_ids"], class_lengths=classes["attention_mask"].sum(dim=1),
                             labels=torch.tensor([s["label"] for s in samples]))
            return batch

        return train, SampleLoader(val, with_classes, rows, dp_rank, dp_size, shuffle=False, epochs=1)
