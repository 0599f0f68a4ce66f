"""`tessera eval retrieval`: a `tessera clip` checkpoint's image<->text Recall@1/5/10 on a folder of
images with captions.jsonl (the layout `tessera clip` trains on), every pair against every other."""
from __future__ import annotations

from pathlib import Path

import torch

from tessera.core.checkpoint import find_checkpoint, load_weights, read_model_config
from tessera.core.config import ConfigError, load_config
from tessera.core.tokenizer import load_tokenizer
from tessera.multimodal.clip import CLIP
from tessera.multimodal.clip_task import ClipBatch, image_transform, read_pairs
from tessera.multimodal.retrieval import image_text_recall


@torch.no_grad()
def retrieval_scores(ckpt: str | Path, folder: str | Path, batch_size: int = 64, device: str = "cpu") -> dict:
    ckpt = find_checkpoint(ckpt)
    run_config = ckpt / "run_config.toml"
    if not run_config.exists() or "[clip]" not in run_config.read_text():
        raise ConfigError(f"{ckpt} is not a tessera clip checkpoint (no run_config.toml with [clip])")
    cfg = load_config(run_config)
    model = CLIP(cfg.vision, read_model_config(ckpt), cfg.clip).to(device)
    load_weights(model, ckpt)
    model.eval()
    pairs, _ = read_pairs(str(folder), "--data", image_transform(cfg.vision))
    to_tensors = ClipBatch(load_tokenizer(ckpt), cfg.train.seq_len)
    images, texts, caption_ids = [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = to_tensors({"pixel_values": torch.stack([p["pixel_values"] for p in chunk]),
                            "texts": [p["text"] for p in chunk]})
        image, text, _ = model(batch["pixel_values"].to(device), batch["input_ids"].to(device),
                               batch["lengths"].to(device))
        images.append(image)
        texts.append(text)
        caption_ids.append(batch["caption_ids"])
    recall = image_text_recall(torch.cat(images), torch.cat(texts), torch.cat(caption_ids).to(device))
    return {"pairs": len(pairs), **{k: v.item() for k, v in recall.items()}}
