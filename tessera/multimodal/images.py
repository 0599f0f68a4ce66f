"""Images in: safe decoding with Pillow, and the resize / center-crop / normalize that an image
encoder was trained with.

Decoding refuses what is not an image, an empty file and a decompression bomb: the pixel count
is read from the header and checked before a single pixel is decoded, so a 20000x20000 PNG of a
few kilobytes costs nothing. Every refusal is an `ImageError` (a `DataError`: one line, exit 2)
that names the file, or the shard and key.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tessera.core.data import DataError

MAX_PIXELS = 1 << 25  # 33.5 megapixels, e.g. 8192 x 4096; a bigger image is refused unread
STORED_FORMATS = {"PNG": "png", "JPEG": "jpg"}  # kept byte for byte in shards; others become PNG


class ImageError(DataError):
    """An image that cannot be used: not an image, empty, truncated or too large. The message
    names where it came from (a file, or a shard and key)."""


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("images need Pillow: pip install 'tessera[vision]'") from None
    return Image


def open_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS):
    """The Pillow image of `data` with only its header read, once its size is known to be safe."""
    Image = _pil()
    if not data:
        raise ImageError(f"{where}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{where}: refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{where}: not an image Pillow can read ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{where}: unreadable image header ({e})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{where}: image of size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"{where}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                         f"{max_pixels:,} (a decompression bomb, or an image to downscale first)")
    return image


def decode_rgb(data: bytes, where: str, max_pixels: int = MAX_PIXELS):
    """`data` decoded into an RGB Pillow image; a truncated or corrupt body is an ImageError too."""
    return _rgb(open_image(data, where, max_pixels), where)


def _rgb(image, where: str):
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{where}: corrupt or truncated image ({e})") from None


def stored_bytes(data: bytes, where: str, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes to store, their extension "png" or "jpg", (width, height)) of a validated image:
    PNG and JPEG keep their original bytes, any other format Pillow reads becomes a PNG."""
    image = open_image(data, where, max_pixels)
    fmt = image.format
    rgb = _rgb(image, where)
    if fmt in STORED_FORMATS:
        return data, STORED_FORMATS[fmt], rgb.size
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), "png", rgb.size


@dataclass(frozen=True)
class ImageTransform:
    """RGB image -> float32 tensor (3, size, size): resize, crop, scale to [0, 1], normalize with
    the encoder's own mean and std. `crop=True` resizes the shorter side to `size` and takes the
    centre (CLIP); `crop=False` resizes straight to size x size (SigLIP)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    crop: bool = True
    resample: str = "bicubic"

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"image size={self.size} must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean} and std={self.std} need 3 channels each, std > 0")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample={self.resample!r}; valid: {', '.join(RESAMPLE)}")

    def resized(self, image):
        """The resized and cropped RGB Pillow image, still 8-bit."""
        Image = _pil()
        resample = getattr(Image.Resampling, RESAMPLE[self.resample])
        width, height = image.size
        if not self.crop:
            return image.resize((self.size, self.size), resample) if image.size != (self.size, self.size) else image
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        new = (self.size, new_long) if width <= height else (new_long, self.size)
        if new != image.size:
            image = image.resize(new, resample)
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image) -> torch.Tensor:
        pixels = np.asarray(self.resized(image), dtype=np.float32) / np.float32(255.0)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}

PRESETS = {
    "clip": dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), crop=True),
    "siglip": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop=False),
    "imagenet": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop=True),
}


def preset(name: str, size: int = 224) -> ImageTransform:
    """The transform of a named encoder family at `size` pixels."""
    if name not in PRESETS:
        raise ValueError(f"image preset {name!r}; valid: {', '.join(PRESETS)}")
    return ImageTransform(size=size, **PRESETS[name])
