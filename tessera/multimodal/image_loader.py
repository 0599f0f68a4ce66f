"""A streaming, resumable loader of image-text batches from `prepare-images` shards.

The dealing of shards to rank x worker streams, the shuffling and the two-integer state are the
text loader's (`core.data.streams.ShardStreams`), so a resumed run replays exactly. Images are
decoded and transformed inside the DataLoader workers. A corrupt image (or shard) is, per
`on_error`, an error naming the shard and key, or skipped and counted in `skipped`; it never
kills a worker with a traceback of its own.

A batch is a dict: `pixel_values` float32 (B, 3, H, W), `keys`, and `texts` (one caption of
each image, or its question) with `answers` for question/answer data; when an image has several,
the one used is fixed by (seed, epoch, key), and `negatives` holds its hard-negative captions
when the shards carry them. `text_collate` (e.g. `CaptionTokens`,
`PromptAnswerTokens`) adds token ids to the batch, in the workers too.
"""
from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import webdataset as wds

from tessera.core.data import DataError, ShardStreams
from tessera.core.data.loader import reason
from tessera.multimodal.image_shards import ImageManifest, ImageShard, row_negatives
from tessera.multimodal.images import MAX_PIXELS, ImageError, ImageTransform, decode_rgb

IMAGE_EXTENSIONS = ("png", "jpg")


class ImageTextLoader(ShardStreams):
    """Batches of transformed images and their texts for one rank."""

    fewer_shards_hint = "re-prepare with a smaller --shard-samples or use fewer workers"

    def __init__(
        self,
        manifest: ImageManifest,
        split: str,
        batch_size: int,
        transform: ImageTransform,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        on_error: str = "raise",
        epochs: int | None = None,
        text_collate: Callable[[dict], dict] | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}; valid: raise, skip")
        super().__init__(manifest.shards(split), f"{split} split of {manifest.root}", batch_size, rank, world_size,
                         num_workers, seed, shuffle, shuffle_buffer, epochs)
        self.manifest, self.split, self.transform = manifest, split, transform
        self.on_error, self.text_collate, self.max_pixels = on_error, text_collate, max_pixels
        self.too_small_reason = f"a stream holds fewer than batch_size={batch_size} images"
        self.bad = 0  # images and shards skipped in this process
        self.text_epoch = 0
        self.batches_per_epoch(0)  # fail now, not mid-run, when the data cannot feed every stream

    def batches_in(self, shards: list[ImageShard]) -> int:
        return sum(s.samples for s in shards) // self.batch_size

    def errors_seen(self) -> int:
        return self.bad

    def stream_batches(self, epoch: int, worker: int, skip: int):
        self.text_epoch = epoch  # which text of an image with several: fixed by (seed, epoch, key)
        yield from super().stream_batches(epoch, worker, skip)

    def items(self, shards: list[ImageShard]) -> Iterator[tuple[str, dict]]:
        """(shard path, raw sample) of every sample of `shards`; an unreadable shard is an error
        naming it, or with on_error="skip" the rest of it is skipped and counted."""
        for shard in shards:
            path = Path(self.manifest.root) / shard.name
            try:
                for sample in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None,
                                             workersplitter=None, empty_check=False):
                    yield str(path), sample
            except Exception as e:
                if self.on_error != "skip":
                    raise DataError(f"corrupt or truncated image shard {path}: {reason(e)}") from e
                warnings.warn(f"skipping the rest of image shard {path}: {reason(e)}")
                self.bad += 1

    def ready(self, item: tuple[str, dict]) -> dict | None:
        """The decoded, transformed sample with its texts; None (counted) for a bad one under on_error="skip"."""
        shard, sample = item
        where = f"{shard} key {sample['__key__']}"
        try:
            return self._decode(sample, where)
        except DataError as e:
            if self.on_error != "skip":
                raise
            warnings.warn(f"skipping an unusable image: {e}")
            self.bad += 1
            return None

    def _decode(self, sample: dict, where: str) -> dict:
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None or "json" not in sample:
            raise ImageError(f"{where}: a sample needs an image ({' or '.join(IMAGE_EXTENSIONS)}) and a json")
        try:
            text = json.loads(sample["json"])
            rows = text["captions"] if self.manifest.kind == "captions" else text["qa"]
            if not rows:
                raise ValueError("no texts")
            if "negatives" in text and (not isinstance(text["negatives"], list) or len(text["negatives"]) != len(rows)):
                raise ValueError("\"negatives\" must hold one list per caption")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: unusable json ({e})") from None
        pick = random.Random(f"{self.seed}/{self.text_epoch}/{sample['__key__']}").randrange(len(rows))
        pixels = self.transform(decode_rgb(data, where, self.max_pixels))
        out = {"pixel_values": pixels, "key": sample["__key__"], "row": rows[pick]}
        if "negatives" in text:
            out["negatives"] = row_negatives({"negatives": text["negatives"][pick]}, where)
        return out

    def collate(self, samples: list[dict]) -> dict:
        batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                 "keys": [s["key"] for s in samples]}
        if self.manifest.kind == "captions":
            batch["texts"] = [s["row"] for s in samples]
            if all("negatives" in s for s in samples):
                batch["negatives"] = [s["negatives"] for s in samples]
        else:
            batch["texts"] = [s["row"]["question"] for s in samples]
            batch["answers"] = [s["row"]["answer"] for s in samples]
        return self.text_collate(batch) if self.text_collate else batch
