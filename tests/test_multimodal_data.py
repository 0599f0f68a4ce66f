"""Image data: decoding and its refusals, the encoder transforms against transformers' own image
processors, prepare-images shards, and the image-text loader (pixels, texts, dealing, resume)."""
import io
import itertools
import json
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tessera.cli.main import main
from tessera.core.data import DataError
from tessera.core.tokenizer import train_char
from tessera.multimodal.image_loader import ImageTextLoader
from tessera.multimodal.image_shards import prepare_images, read_image_manifest
from tessera.multimodal.images import ImageError, ImageTransform, decode_rgb, preset
from tessera.multimodal.scenes import synth_scenes
from tessera.multimodal.text_tokens import IGNORE, CaptionTokens, PromptAnswerTokens

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with two rows of data: a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1) * 2))
            + chunk(b"IEND", b""))


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    synth_scenes(root, 24, size=32, seed=7)
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    # a second caption for every image: the loader picks one per (seed, epoch, key)
    extra = [{"image": r["image"], "caption": f"picture {r['image'][:6]}"} for r in rows]
    (root / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return root


@pytest.fixture(scope="module")
def shards(scenes, tmp_path_factory):
    """24 training images in 8 shards of 3 (no validation split), two captions each."""
    return prepare_images(scenes / "images", scenes / "two.jsonl", tmp_path_factory.mktemp("shards"),
                          val_fraction=0.0, shard_samples=3)


def key_to_image(manifest) -> dict[str, str]:
    names = {}
    for shard in manifest.splits["train"]:
        with tarfile.open(manifest.root / shard.name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    names[m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())["image"]
    return names


def reference_pixels(path: Path, mean, std) -> np.ndarray:
    """Pillow decode and a float64 normalize, for an image already at the target size."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return ((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def test_decoding_refuses_non_images_empty_files_and_bombs_before_decoding(monkeypatch):
    with pytest.raises(ImageError, match=r"notes.txt: not an image"):
        decode_rgb(b"hello, not a picture", "notes.txt")
    with pytest.raises(ImageError, match=r"empty.png: empty file \(0 bytes\)"):
        decode_rgb(b"", "empty.png")
    with pytest.raises(ImageError, match=r"trunc.png: corrupt or truncated"):
        decode_rgb(png_bytes(np.zeros((40, 40, 3), np.uint8))[:-30], "trunc.png")

    def no_decoding(self):
        raise AssertionError("a bomb was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = png_claiming(20000, 20000)
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match=r"bomb.png: refused as a decompression bomb"):
        decode_rgb(bomb, "bomb.png")
    with pytest.raises(ImageError, match=r"big.png: 6000x6000 = 36,000,000 pixels exceeds the limit"):
        decode_rgb(png_claiming(6000, 6000), "big.png")
    with pytest.raises(ImageError, match=r"exceeds the limit of 1,000"):
        decode_rgb(png_claiming(40, 40), "small.png", max_pixels=1000)


@pytest.mark.parametrize("shape", [(37, 50), (50, 37), (24, 24)])
def test_clip_and_siglip_transforms_match_transformers(shape):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    # Both resize the 8-bit image with Pillow's bicubic, so the pixels before scaling are the same;
    # what remains is float32 rounding of (x / 255 - mean) / std, |x| <= 4: a few ulp of 4.
    tol = 8 * 4 * float(np.finfo(np.float32).eps)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    expected = hf(images=image, return_tensors="np")["pixel_values"][0]
    got = preset("clip", 24)(image)
    assert got.dtype == torch.float32 and got.shape == (3, 24, 24)
    np.testing.assert_allclose(got.numpy(), expected, atol=tol, rtol=0)
    hf = SiglipImageProcessorPil(size={"height": 24, "width": 24})
    np.testing.assert_allclose(preset("siglip", 24)(image).numpy(), hf(images=image, return_tensors="np")[
        "pixel_values"][0], atol=tol, rtol=0)
    with pytest.raises(ValueError, match="valid: clip, siglip, imagenet"):
        preset("dino")
    with pytest.raises(ValueError, match="std > 0"):
        ImageTransform(std=(0.5, 0.0, 0.5))


def test_prepare_images_writes_validated_shards_and_a_manifest(scenes, shards):
    assert shards.kind == "captions" and shards.images == 24 and shards.texts == 48
    assert [s.name for s in shards.splits["train"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert shards.width == {"min": 32, "max": 32, "mean": 32.0}
    assert read_image_manifest(shards.root).splits == shards.splits
    names = key_to_image(shards)
    with tarfile.open(shards.root / "train-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        stored = tar.extractfile(member).read()
    assert stored == (scenes / "images" / names[member.name.split(".")[0]]).read_bytes()  # the original bytes

    split = prepare_images(scenes / "images", scenes / "vqa.jsonl", shards.root.parent / "vqa", val_fraction=0.25)
    assert split.kind == "vqa" and split.samples("train") == 18 and split.samples("val") == 6
    again = prepare_images(scenes / "images", scenes / "vqa.jsonl", shards.root.parent / "vqa2", val_fraction=0.25)
    assert key_to_image(again) == key_to_image(split)  # the held-out images depend on their paths only
    (shards.root.parent / "text").mkdir()
    (shards.root.parent / "text" / "manifest.json").write_text(json.dumps({"dtype": "uint16", "splits": {}}))
    with pytest.raises(DataError, match="not a manifest of image shards"):
        read_image_manifest(shards.root.parent / "text")


def test_bad_images_at_prepare_time_are_named_or_counted(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "good.png").write_bytes(png_bytes(np.full((8, 8, 3), 9, np.uint8)))
    (images / "notes.png").write_text("not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "bomb.png").write_bytes(png_claiming(20000, 20000))
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n" + "".join(f"{n}.png,a {n}\n" for n in ("good", "notes", "empty", "bomb")))
    for bad, why in (("notes", "not an image"), ("empty", "empty file"), ("bomb", "decompression bomb")):
        only = tmp_path / f"{bad}.csv"
        only.write_text(f"image,caption\ngood.png,a\n{bad}.png,b\n")
        with pytest.raises(ImageError, match=rf"{bad}.png: .*{why}"):
            prepare_images(images, only, tmp_path / "out", val_fraction=0.0)
        assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.warns(UserWarning, match="skipped 3 unusable image"):
        manifest = prepare_images(images, table, tmp_path / "out", val_fraction=0.0, on_error="skip")
    assert manifest.images == 1 and manifest.skipped == 3 and len(manifest.skipped_files) == 3
    (tmp_path / "bad.jsonl").write_text('{"image": "good.png", "caption": "x"}\n{"image": "good.png"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no non-empty string field 'caption'"):
        prepare_images(images, tmp_path / "bad.jsonl", tmp_path / "o2")
    (tmp_path / "up.jsonl").write_text('{"image": "../captions.csv", "caption": "x"}\n')
    with pytest.raises(ImageError, match="outside the images directory"):
        prepare_images(images, tmp_path / "up.jsonl", tmp_path / "o3")


def test_loader_gives_the_images_pixels_and_one_of_their_captions(scenes, shards):
    names = key_to_image(shards)
    captions = {}
    for line in (scenes / "two.jsonl").read_text().splitlines():
        row = json.loads(line)
        captions.setdefault(row["image"], []).append(row["caption"])
    loader = ImageTextLoader(shards, "train", 4, preset("clip", 32), seed=3, epochs=2)
    seen, chosen = [], []
    for batch in loader:
        assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (4, 3, 32, 32)
        for pixels, key, text in zip(batch["pixel_values"], batch["keys"], batch["texts"]):
            ref = reference_pixels(scenes / "images" / names[key], CLIP_MEAN, CLIP_STD)
            np.testing.assert_allclose(pixels.numpy(), ref, atol=1e-5, rtol=0)
            assert text in captions[names[key]]
            seen.append(key)
            chosen.append(text)
    assert sorted(seen[:24]) == sorted(names) and sorted(seen[24:]) == sorted(names)  # each once per epoch
    assert seen[:24] != seen[24:]  # reshuffled
    assert any(t.startswith("picture") for t in chosen) and any(not t.startswith("picture") for t in chosen)


@pytest.mark.parametrize("world,workers,batch,covered", [(2, 2, 2, 24), (8, 0, 3, 24), (1, 3, 2, 18)])
def test_rank_by_worker_dealing_covers_each_sample_once_per_epoch(shards, world, workers, batch, covered):
    """8 shards of 3 images: 4 or 8 streams take every image once; 3 streams hold 9, 9 and 6 images,
    and each yields the smallest stream's 6 (the documented cut), never an image twice."""
    keys = []
    for rank in range(world):
        loader = ImageTextLoader(shards, "train", batch, preset("clip", 32), rank=rank, world_size=world,
                                 num_workers=workers, seed=11, epochs=1)
        keys += [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) == covered and set(keys) <= set(key_to_image(shards))
    with pytest.raises(DataError, match="has 8 shard.*need at least 9.*--shard-samples"):
        ImageTextLoader(shards, "train", 2, preset("clip", 32), num_workers=9)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_iteration_equals_the_uninterrupted_one(shards, workers):
    def make():
        return ImageTextLoader(shards, "train", 2, preset("clip", 32), num_workers=workers, seed=5, epochs=2)
    full = [(b["keys"], b["texts"], b["pixel_values"]) for b in make()]
    first = make()
    head = [(b["keys"], b["texts"], b["pixel_values"]) for b in itertools.islice(iter(first), 9)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [(b["keys"], b["texts"], b["pixel_values"]) for b in resumed]
    assert len(head) + len(rest) == len(full) == 24
    for got, want in zip(head + rest, full):
        assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def corrupt_one_image(manifest, out: Path) -> tuple[str, str]:
    """A copy of the shards with the first image of the first shard replaced by junk: (shard, key)."""
    out.mkdir()
    for f in manifest.root.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    shard = manifest.splits["train"][0].name
    with tarfile.open(manifest.root / shard) as src, tarfile.open(out / shard, "w") as dst:
        members = src.getmembers()
        victim = next(m for m in members if m.name.endswith(".png"))
        for m in members:
            data = b"\x89PNG junk" if m is victim else src.extractfile(m).read()
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return shard, victim.name.split(".")[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_at_load_time_is_named_or_counted(shards, tmp_path, workers):
    shard, key = corrupt_one_image(shards, tmp_path / "bad")
    manifest = read_image_manifest(tmp_path / "bad")
    loader = ImageTextLoader(manifest, "train", 2, preset("clip", 32), num_workers=workers, shuffle=False, epochs=1)
    with pytest.raises(ImageError, match=rf"{shard} key {key}: .*not an image") as error:
        list(loader)
    assert "\n" not in str(error.value)  # one line, even from a worker
    loader = ImageTextLoader(manifest, "train", 2, preset("clip", 32), num_workers=workers, shuffle=False,
                             epochs=1, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning names the image; in a worker it goes to stderr
        batches = list(loader)
    # the stream left one image short reads its shards a second time, meeting the bad image again
    assert len(batches) == loader.batches_per_epoch(0) and loader.skipped == 2
    assert key not in [k for b in batches for k in b["keys"]]


def test_text_collates_tokenize_captions_and_answers(shards, scenes):
    tok = train_char(["abcdefghijklmnopqrstuvwxyz ?0123456789"])
    caps = CaptionTokens(tok, max_len=12)({"texts": ["a red circle", "ab"]})
    assert caps["input_ids"].shape == (2, 12)
    assert caps["input_ids"][0].tolist() == tok.encode("a red circl") + [tok.eos_id]  # cut, eos kept
    assert caps["input_ids"][1].tolist() == tok.encode("ab") + [tok.eos_id] + [tok.pad_id] * 9
    assert caps["attention_mask"].sum(1).tolist() == [12, 3]

    qa = PromptAnswerTokens(tok, max_len=40)({"texts": ["how many?", "is it?"], "answers": ["two", "no"]})
    row, targets = qa["input_ids"][0].tolist(), qa["targets"][0].tolist()
    prompt = tok.encode("how many?")
    assert row == prompt + tok.encode("two") + [tok.eos_id]
    assert targets == [IGNORE] * (len(prompt) - 1) + tok.encode("two") + [tok.eos_id] + [IGNORE]
    # "is it?" is 6 tokens: 5 positions before the answer, then the last token and 4 of padding (row 0 is 13 long)
    assert qa["targets"][1].tolist() == [IGNORE] * 5 + tok.encode("no") + [tok.eos_id] + [IGNORE] * 5
    assert qa["attention_mask"].sum(1).tolist() == [13, 9]

    vqa = prepare_images(scenes / "images", scenes / "vqa.jsonl", shards.root.parent / "vqa-tok", val_fraction=0.0,
                         shard_samples=3)
    loader = ImageTextLoader(vqa, "train", 3, preset("siglip", 16), num_workers=2, epochs=1,
                             text_collate=PromptAnswerTokens(tok, 60))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["input_ids"].shape[0] == 3
    assert [tok.decode(r[t != IGNORE].tolist()) for r, t in zip(batch["targets"], batch["targets"])] == \
        [a + tok.eos for a in batch["answers"]]


def test_cli_prepares_images_and_bad_input_is_one_line_exit_2(scenes, tmp_path, capsys):
    assert main(["data", "prepare-images", "--images", str(scenes / "images"), "--captions",
                 str(scenes / "captions.jsonl"), "--out", str(tmp_path / "ok"), "--val-fraction", "0.25"]) == 0
    assert "captions; train: 18 images" in capsys.readouterr().out
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(b"")
    (tmp_path / "c.jsonl").write_text('{"image": "x.png", "caption": "y"}\n')
    for argv in (["data", "prepare-images", "--images", str(tmp_path / "img"), "--captions", str(tmp_path / "c.jsonl"),
                  "--out", str(tmp_path / "o")],
                 ["data", "synth-scenes", "--out", str(tmp_path / "s"), "--n", "0"],
                 ["data", "digits", "--out", str(tmp_path / "d"), "--size", "12"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tessera: error: ") and err.count("\n") == 1


def test_jpeg_is_stored_as_is_and_other_formats_as_png(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    pictures = {name: Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for name in "abc"}
    pictures["a"].save(tmp_path / "img" / "a.jpg", format="JPEG")
    pictures["b"].save(tmp_path / "img" / "b.bmp", format="BMP")
    pictures["c"].convert("RGBA").save(tmp_path / "img" / "c.png", format="PNG")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"image": n, "caption": n}) + "\n"
                                              for n in ("a.jpg", "b.bmp", "c.png")))
    manifest = prepare_images(tmp_path / "img", tmp_path / "t.jsonl", tmp_path / "out", val_fraction=0.0,
                              shard_samples=3)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        stored = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert stored == {"jpg", "png", "json"}
    batch = next(iter(ImageTextLoader(manifest, "train", 3, preset("siglip", 20), shuffle=False, epochs=1)))
    for pixels, name in zip(batch["pixel_values"], batch["texts"]):
        ref = reference_pixels(tmp_path / "img" / name, (0.5,) * 3, (0.5,) * 3)  # the JPEG as Pillow decodes it
        np.testing.assert_allclose(pixels.numpy(), ref, atol=1e-5, rtol=0)
