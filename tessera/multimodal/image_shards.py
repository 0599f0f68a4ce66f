"""`tessera data prepare-images`: a folder of images plus a captions or question/answer table
(JSONL or CSV) into WebDataset shards of `{key}.png|jpg` (the original bytes, validated) and
`{key}.json` (the image's texts, and the hard-negative captions of each caption where the JSONL rows
list them in "negatives"), with a manifest.

One sample per image, holding every caption (or question/answer pair) of that image, so an
image never sits in both splits. The validation split is a fixed fraction of the images chosen
by a hash of their paths: the same images whatever the table's order. Files are written the
way the text data is: each shard aside then renamed, the manifest last, so an interrupted run
leaves no manifest and the directory cannot be mistaken for a prepared one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds

from tessera.core.data import DataError
from tessera.core.data.jsonl import numbered_objects
from tessera.core.storage import write_text_atomic, written_aside
from tessera.multimodal.images import MAX_PIXELS, ImageError, stored_bytes

MANIFEST = "manifest.json"
FORMAT = "tessera-images/1"
KINDS = {"captions": ("caption",), "vqa": ("question", "answer")}
MIN_SHARDS = 8
MAX_SHARD_SAMPLES = 1000


@dataclass(frozen=True)
class ImageShard:
    name: str
    samples: int  # images
    texts: int  # captions or question/answer pairs


@dataclass(frozen=True)
class ImageManifest:
    root: Path
    kind: str  # "captions" or "vqa"
    splits: dict[str, list[ImageShard]]
    images: int = 0
    texts: int = 0
    skipped: int = 0  # images refused with on_error="skip"
    skipped_files: list[str] = field(default_factory=list)  # the first of them, with why
    width: dict = field(default_factory=dict)  # min, max, mean of the stored images
    height: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    negatives: int = 0  # the fewest hard-negative captions a caption carries (its row's "negatives")
    format: str = FORMAT

    def shards(self, split: str) -> list[ImageShard]:
        if not self.splits.get(split):
            raise DataError(f"{self.root} has no {split!r} image shards; splits: {', '.join(self.splits) or 'none'}")
        return self.splits[split]

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.splits.get(split, []))

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=2)


def read_image_manifest(root: str | Path) -> ImageManifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise DataError(f"no {MANIFEST} in {root}: run `tessera data prepare-images --out {root}` first")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise DataError(f"{path} is not a manifest of image shards (format {raw.get('format')!r}, "
                            f"expected {FORMAT!r}): prepare it with `tessera data prepare-images`")
        splits = {k: [ImageShard(**s) for s in v] for k, v in raw.pop("splits").items()}
        return ImageManifest(root=root, splits=splits, **raw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"unreadable {path}: {e}") from None


def row_negatives(row: dict, where: str) -> list[str]:
    """A captions row's hard-negative captions ("negatives", none when absent), checked."""
    hard = row.get("negatives", [])
    if not isinstance(hard, list) or not all(isinstance(t, str) and t.strip() for t in hard):
        raise DataError(f"{where}: \"negatives\" must be a list of non-empty captions "
                        "(hard negatives: texts that do not describe the image)")
    return hard


def read_table(path: str | Path) -> tuple[str, dict[str, list[dict]]]:
    """(kind, {image path: its text rows}) of a captions or question/answer table, images in
    the order they first appear; an unusable row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"captions file {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n + 2, row) for n, row in enumerate(csv.DictReader(f))]
    elif path.suffix == ".jsonl":
        rows = list(numbered_objects(path))
    else:
        raise DataError(f"{path}: captions must be a .jsonl or .csv file")
    kind, images = None, {}
    for lineno, row in rows:
        if isinstance(row, ValueError):
            raise DataError(f"{path}:{lineno}: {row}")
        row_kind = "vqa" if "question" in row else "captions"
        kind = kind or row_kind
        fields = ("image", *KINDS[kind])
        if row_kind != kind:
            raise DataError(f"{path}:{lineno}: a {row_kind} row in a table of {kind} (fields {', '.join(fields)})")
        bad = [k for k in fields if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad:
            raise DataError(f"{path}:{lineno}: no non-empty string field {', '.join(map(repr, bad))} "
                            f"(a {kind} row has {', '.join(fields)})")
        kept = {k: row[k] for k in KINDS[kind]}
        if kind == "captions" and "negatives" in row:
            kept["negatives"] = row_negatives(row, f"{path}:{lineno}")
        images.setdefault(row["image"], []).append(kept)
    if not images:
        raise DataError(f"{path}: no rows")
    return kind, images


def _image_file(images_dir: Path, relative: str) -> Path:
    """The file `relative` names, refused when it lies outside the images directory."""
    path = (images_dir / relative).resolve()
    if not path.is_relative_to(images_dir.resolve()):
        raise ImageError(f"{relative}: outside the images directory {images_dir}")
    if not path.is_file():
        raise ImageError(f"{images_dir / relative}: no such image file")
    return path


def _split(names: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) in table order; val is round(n * val_fraction) images chosen by path hash."""
    n_val = round(len(names) * val_fraction)
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    val = set(ranked[:n_val])
    return [n for n in names if n not in val], [n for n in names if n in val]


def _stats(values: list[int]) -> dict:
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 2)} if values else {}


def prepare_images(images: str | Path, captions: str | Path, out: str | Path, val_fraction: float = 0.1,
                   shard_samples: int = 0, on_error: str = "raise", max_pixels: int = MAX_PIXELS) -> ImageManifest:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if shard_samples < 0:
        raise DataError("--shard-samples must be >= 0 (0: sized for 8 shards a split)")
    if on_error not in ("raise", "skip"):
        raise DataError(f"--on-error={on_error!r}; valid: raise, skip")
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise DataError(f"images directory {images_dir} does not exist")
    kind, table = read_table(captions)
    rows = [r for image_rows in table.values() for r in image_rows]
    with_negatives = any("negatives" in r for r in rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in [*out.glob("train-*.tar"), *out.glob("val-*.tar"), *out.glob(".*.tar.tmp")]:
        stale.unlink()  # shards of an earlier run; other files in `out` are left alone
    skipped: list[str] = []
    widths, heights = [], []
    splits = {}
    for split, names in zip(("train", "val"), _split(list(table), val_fraction)):
        if not names:
            continue
        per_shard = shard_samples or max(1, min(MAX_SHARD_SAMPLES, math.ceil(len(names) / MIN_SHARDS)))
        writer = _SplitWriter(out, split, per_shard)
        for name in names:
            try:
                data, ext, (w, h) = stored_bytes(_image_file(images_dir, name).read_bytes(),
                                                 str(images_dir / name), max_pixels)
            except ImageError as e:
                if on_error != "skip":
                    raise
                skipped.append(str(e))
                continue
            text = {"image": name, **({"captions": [r["caption"] for r in table[name]]} if kind == "captions"
                                      else {"qa": table[name]})}
            if with_negatives:
                text["negatives"] = [r.get("negatives", []) for r in table[name]]
            writer.add(ext, data, text)
            widths.append(w)
            heights.append(h)
        splits[split] = writer.close()
        if not splits[split]:
            del splits[split]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unusable image(s), the first: {skipped[0]}", stacklevel=2)
    if "train" not in splits:
        raise DataError(f"no usable image in the train split of {captions}")
    manifest = ImageManifest(
        out, kind, splits, images=len(widths), texts=sum(s.texts for v in splits.values() for s in v),
        skipped=len(skipped), skipped_files=skipped[:20], width=_stats(widths), height=_stats(heights),
        sources=[str(images_dir), str(captions)], negatives=min(len(r.get("negatives", [])) for r in rows))
    write_text_atomic(out / MANIFEST, manifest.to_json())
    return manifest


class _SplitWriter:
    """Fills `{split}-NNNNNN.tar` shards of `per_shard` images, each written aside and renamed."""

    def __init__(self, out: Path, split: str, per_shard: int):
        self.out, self.split, self.per_shard = out, split, per_shard
        self.shards: list[ImageShard] = []
        self.samples: list[tuple[str, bytes, dict]] = []
        self.key = 0

    def add(self, ext: str, data: bytes, text: dict) -> None:
        self.samples.append((ext, data, text))
        if len(self.samples) == self.per_shard:
            self._flush()

    def close(self) -> list[ImageShard]:
        if self.samples:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        final = self.out / name
        tmp = final.with_name(f".{name}.tmp")
        with written_aside(tmp, final):
            with wds.TarWriter(str(tmp)) as sink:
                for ext, data, text in self.samples:
                    sink.write({"__key__": f"{self.split}{self.key:08d}", ext: data,
                                "json": json.dumps(text, ensure_ascii=False).encode()})
                    self.key += 1
            os.replace(tmp, final)
        texts = sum(len(t.get("captions", t.get("qa", []))) for _, _, t in self.samples)
        self.shards.append(ImageShard(name, len(self.samples), texts))
        self.samples = []
