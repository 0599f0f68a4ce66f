"""The ViT image encoder: shapes and pooling, training from scratch, and import of Hugging Face CLIP
and SigLIP vision towers whose features and gradients equal transformers' own."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tessera.core.config import ConfigError, VisionConfig, load_config
from tessera.multimodal.hf_vision import load_vision_weights, vision_config_from_hf
from tessera.multimodal.vision import VisionTransformer

transformers = pytest.importorskip("transformers")
TINY = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=20,
            patch_size=5)


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_shapes_and_pooling(pool):
    cfg = VisionConfig(image_size=12, patch_size=4, n_layers=2, n_heads=2, d_model=16, pool=pool)
    model = VisionTransformer(cfg)
    tokens, pooled = model(torch.randn(3, 3, 12, 12))
    assert tokens.shape == (3, 9 + (pool == "cls"), 16) and pooled.shape == (3, 16)
    if pool == "mean":
        torch.testing.assert_close(pooled, tokens.mean(1))
    if pool == "cls":
        torch.testing.assert_close(pooled, tokens[:, 0])


def test_attention_is_not_causal():
    """The first patch's feature depends on the last patch: no causal mask in the encoder."""
    model = VisionTransformer(VisionConfig(image_size=8, patch_size=4, n_layers=1, n_heads=2, d_model=8, pool="mean"))
    pixels = torch.randn(1, 3, 8, 8, requires_grad=True)
    tokens, _ = model(pixels)
    (tokens[0, 0] * torch.randn(8)).sum().backward()
    assert pixels.grad[0, :, 4:, 4:].abs().sum() > 0


def test_trains_from_scratch(one_thread):
    """A few steps of AdamW separate two classes of images (bright vs dark) by the pooled feature."""
    torch.manual_seed(0)
    model = VisionTransformer(VisionConfig(image_size=8, patch_size=4, n_layers=1, n_heads=2, d_model=16))
    head = torch.nn.Linear(16, 2)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    labels = torch.arange(16) % 2
    pixels = torch.randn(16, 3, 8, 8) * 0.3 + (labels[:, None, None, None] * 2 - 1.0)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(head(model(pixels)[1]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_config_is_checked():
    with pytest.raises(ConfigError, match="vision.image_size=30 must be divisible by vision.patch_size=8"):
        load_config(None, ["--vision.image_size=30"])
    with pytest.raises(ConfigError, match="vision.pool='nope' is not valid"):
        load_config(None, ["--vision.pool=nope"])
    with pytest.raises(ConfigError, match="final_norm='tokens'"):
        load_config(None, ["--vision.pool=map", "--vision.final_norm=pooled"])


def hf_tower(kind: str, whole: bool, directory):
    """A random-initialised tower saved by transformers itself (biases and norms randomised too, so a
    mapping that mixes them up cannot pass)."""
    torch.manual_seed(0)
    if kind == "clip":
        vision = transformers.CLIPVisionConfig(**TINY)
        model = (transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision.to_dict(), text_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            bos_token_id=0, eos_token_id=1, pad_token_id=2)))
                 if whole else transformers.CLIPVisionModel(vision))
    else:
        vision = transformers.SiglipVisionConfig(**TINY)
        model = (transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision.to_dict(), text_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)))
                 if whole else transformers.SiglipVisionModel(vision))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return getattr(model, "vision_model", model).eval()


@pytest.mark.parametrize("kind,whole", [("clip", False), ("clip", True), ("siglip", False), ("siglip", True)])
def test_hf_vision_tower_matches_transformers(kind, whole, tmp_path):
    reference = hf_tower(kind, whole, tmp_path)
    cfg = vision_config_from_hf(VisionConfig(init_from=f"hf:{tmp_path}"))
    model = VisionTransformer(cfg)
    load_vision_weights(model)
    model.eval()
    pixels = torch.randn(3, 3, 20, 20)
    ours_px, theirs_px = pixels.clone().requires_grad_(), pixels.clone().requires_grad_()
    tokens, pooled = model(ours_px)
    out = reference(pixel_values=theirs_px)
    # float32 through 2 blocks of width 32: rounding is ~1e-6 relative; 1e-4 is the bound
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=1e-4)
    projection = torch.randn(32, 7)
    ((tokens @ projection).square().mean() + (pooled @ projection).sin().sum()).backward()
    ((out.last_hidden_state @ projection).square().mean() + (out.pooler_output @ projection).sin().sum()).backward()
    torch.testing.assert_close(ours_px.grad, theirs_px.grad, atol=1e-5, rtol=1e-4)
    assert cfg.pool == ("cls" if kind == "clip" else "map")


def test_unsupported_hf_configs_are_named(tmp_path):
    hf_tower("siglip", False, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="hidden_act='relu' is not supported"):
        vision_config_from_hf(VisionConfig(init_from=f"hf:{tmp_path}"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_use_head": False}))
    with pytest.raises(ConfigError, match="vision_use_head"):
        vision_config_from_hf(VisionConfig(init_from=f"hf:{tmp_path}"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(ConfigError, match="model_type='vit'"):
        vision_config_from_hf(VisionConfig(init_from=f"hf:{tmp_path}"))
    with pytest.raises(ConfigError, match="has no config.json"):
        vision_config_from_hf(VisionConfig(init_from=f"hf:{tmp_path / 'nowhere'}"))


def test_wrong_image_size_is_refused():
    model = VisionTransformer(dataclasses.replace(VisionConfig(), image_size=16, patch_size=8))
    with pytest.raises(ValueError, match=r"images of shape \(3, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32))
