"""`tessera data digits`: a small set of real scanned images, offline.

scikit-learn ships the UCI ML hand-written digits (1,797 images of 8x8 pixels, 16 grey levels;
E. Alpaydin and C. Kaynak, UCI Machine Learning Repository, licence CC BY 4.0) inside its wheel
(`sklearn.datasets.load_digits`). They are written as upscaled PNGs, dark ink on white, with
the captions "a handwritten digit 7" and the question "what digit is this?" -> "7", in the
layout `synth-scenes` writes, so `prepare-images` takes either.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tessera.core.data import DataError
from tessera.core.storage import write_text_atomic

QUESTION = "what digit is this?"


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, size, size), labels (N,)): 8x8 scans scaled by nearest neighbour, ink dark."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits come with scikit-learn: pip install 'tessera[vision]'") from None
    if size < 8 or size % 8:
        raise DataError(f"--size={size} must be a multiple of 8 (the scans are 8x8)")
    digits = load_digits()
    ink = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    scale = size // 8
    images = 255 - ink.repeat(scale, axis=1).repeat(scale, axis=2)
    return images, digits.target.astype(np.int64)


def write_digits(out: str | Path, size: int = 32) -> Path:
    """Write `images/NNNNNN.png`, `captions.jsonl` and `vqa.jsonl` of all 1,797 digits."""
    from PIL import Image

    images, labels = digit_images(size)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, vqa = [], []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{i:06d}.png"
        Image.fromarray(image).save(out / "images" / name, format="PNG")
        captions.append({"image": name, "caption": f"a handwritten digit {label}"})
        vqa.append({"image": name, "question": QUESTION, "answer": str(label)})
    for file, rows in (("captions.jsonl", captions), ("vqa.jsonl", vqa)):
        write_text_atomic(out / file, "".join(json.dumps(r) + "\n" for r in rows))
    return out
