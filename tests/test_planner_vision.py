"""The planner's image side: parameter counts against the real `VLM` and `CLIP` modules, the estimate
against the measured CPU peak of VLM training steps (run in fresh subprocesses by this same file,
as tests/test_planner.py does for text models), the image side replicated under tensor
parallelism, and `tessera plan --config`."""
from __future__ import annotations

import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import pytest
import torch

from tessera.core.config import ClipConfig, ModelConfig, VisionConfig, VLMConfig, load_config
from tessera.distributed.planner import Layout, count_params, plan
from tessera.distributed.vision_plan import Vision, count_image_params, image_side
from tests.test_planner import CPU, check_measured, measured_peak, peak_growth, two_steps

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(image_size=64, patch_size=8, n_layers=4, n_heads=6, d_model=384, pool="mean")  # 64 tokens an image
TEXT = dict(vocab_size=4096, n_layers=4, n_heads=4, n_kv_heads=2, d_model=256, norm="rmsnorm", pos="rope",
            mlp="swiglu", tie_embeddings=False)
NARROW_VISION = dict(VISION, patch_size=4, d_model=128, n_heads=4)  # 256 tokens: activations over parameters
NARROW_TEXT = dict(TEXT, vocab_size=1024, n_layers=2, d_model=128, tie_embeddings=True)
MEASURED = {  # towers, fusion, vlm.freeze, images per sample, micro_batch, text positions
    "prefix-all": (NARROW_VISION, NARROW_TEXT, "prefix", ("none",), 1, 4, 64),
    "prefix-align": (VISION, TEXT, "prefix", (), 2, 4, 128),  # stage "align": vision tower and LM frozen
    "cross-instruct": (VISION, TEXT, "cross_attention", ("vision",), 2, 4, 128),
    "clip": (NARROW_VISION, TEXT, "clip", (), 1, 16, 64),  # an untied text tower: its LM head gets no gradient
}


def vlm_case(name: str, tiny: bool = False) -> tuple[VisionConfig, ModelConfig, VLMConfig, int, int, int]:
    """Case `name`'s configs, images per sample, micro-batch and text positions; `tiny`: its warm-up."""
    vision, text_kw, fusion, freeze, images, micro_batch, text = MEASURED[name]
    context = text + images * VisionConfig(**vision).num_tokens
    if tiny:
        vision, text_kw, micro_batch, text = dict(vision, n_layers=1), dict(text_kw, n_layers=1, vocab_size=64), 1, 32
    return (VisionConfig(**vision), ModelConfig(**text_kw, max_seq_len=context),
            VLMConfig(fusion="prefix" if fusion == "clip" else fusion, freeze=freeze, cross_every=2), images,
            micro_batch, text)


def measure_vlm(name: str) -> int:
    """Peak growth of two training steps of case `name` (see `tests.test_planner.peak_growth`)."""
    from tessera.multimodal.clip import CLIP, contrastive_loss
    from tessera.multimodal.vlm import VLM, set_trainable

    def run(warmup: bool) -> None:
        vision, lm, cfg, images, b, text = vlm_case(name, tiny=warmup)
        if MEASURED[name][2] == "clip":
            clip = CLIP(vision, lm, ClipConfig())
            pixels = torch.randn(b, 3, vision.image_size, vision.image_size)
            lengths = torch.full((b,), text)
            ids = torch.randint(0, lm.vocab_size, (b, text))
            two_steps(clip, lambda: contrastive_loss(*clip(pixels, ids, lengths)))
            return
        model = VLM(vision, lm, cfg)
        set_trainable(model, cfg.frozen_parts)
        prefix = images * vision.num_tokens if cfg.fusion == "prefix" else 0

        def loss() -> torch.Tensor:
            ids = torch.randint(0, lm.vocab_size, (b, text + prefix))
            pixels = torch.randn(b * images, 3, vision.image_size, vision.image_size)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, :prefix] = True
            return model(ids, pixels, mask if prefix else None, ids.masked_fill(mask, -100))

        two_steps(model, loss)

    return peak_growth(run)


def estimated_vlm_peak(name: str) -> int:
    vision, lm, cfg, images, b, text = vlm_case(name)
    if MEASURED[name][2] == "clip":
        side = Vision(vision, "clip", images, embed_dim=ClipConfig().embed_dim)
    else:
        side = Vision(vision, cfg.fusion, images, cross_every=cfg.cross_every, frozen=cfg.frozen_parts)
    return plan(lm, 1, 1e9, text, b, Layout(precision="fp32"), CPU, vision=side).total


def check_vlm_measured(name: str) -> None:
    check_measured(name, measured_peak(name, __file__), estimated_vlm_peak(name))


def test_memory_model_matches_a_measured_vlm_step():
    check_vlm_measured("prefix-all")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prefix-align", "cross-instruct", "clip"])
def test_memory_model_matches_more_measured_vlm_and_clip_steps(name):
    check_vlm_measured(name)


TOWERS = [  # ViT (class token), CLIP-like (pre-norm, pooled final norm, quick GELU), SigLIP-like (attention pool)
    VisionConfig(image_size=16, patch_size=4, n_layers=2, n_heads=2, d_model=24, d_ff=40),
    VisionConfig(image_size=16, patch_size=4, n_layers=2, n_heads=2, d_model=24, pool="mean", pre_norm=True,
                 final_norm="pooled", activation="quick_gelu", patch_bias=False),
    VisionConfig(image_size=16, patch_size=4, n_layers=1, n_heads=2, d_model=24, pool="map", activation="gelu_tanh"),
]
TEXTS = [
    ModelConfig(vocab_size=50, n_layers=5, n_heads=2, n_kv_heads=1, d_model=32, norm="rmsnorm", mlp="swiglu",
                tie_embeddings=False),
    ModelConfig(vocab_size=50, n_layers=5, n_heads=2, d_model=32, bias=True, attn_head_dim=16),
]


def parts(model: torch.nn.Module, names: tuple[str, ...]) -> int:
    return sum(p.numel() for name in names for p in getattr(model, name).parameters())


@pytest.mark.parametrize("tower", TOWERS, ids=["vit", "clip", "siglip"])
@pytest.mark.parametrize("text", TEXTS, ids=["llama", "gpt2"])
def test_image_side_param_counts_equal_the_real_modules(tower, text):
    from tessera.multimodal.clip import CLIP
    from tessera.multimodal.vlm import VLM

    for fusion, hidden, every in [("prefix", 0, 2), ("cross_attention", 20, 2), ("cross_attention", 0, 3)]:
        model = VLM(tower, text, VLMConfig(fusion=fusion, projector_hidden=hidden, cross_every=every))
        got = count_image_params(Vision(tower, fusion, projector_hidden=hidden, cross_every=every), text)
        assert got == {part: parts(model, (part,)) for part in ("vision", "projector", "cross")}, fusion
        assert sum(got.values()) + count_params(text)["total"] == parts(model, ("vision", "projector", "cross", "lm"))
    clip = CLIP(tower, text, ClipConfig(embed_dim=12))
    got = count_image_params(Vision(tower, "clip", embed_dim=12), text)
    assert got["vision"] == parts(clip, ("vision",)) and got["cross"] == 0
    assert sum(got.values()) + count_params(text)["total"] == sum(p.numel() for p in clip.parameters())


def kept_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(bytes of the tensors autograd keeps after `forward()`, parameters aside; its output)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        alias = t.detach()  # no grad_fn, no reference cycle: freed with the node that keeps it
        kept.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in kept) if t is not None}
    return sum(n for ptr, n in alive.items() if ptr not in params), out


@pytest.mark.parametrize("tower", TOWERS, ids=["vit", "clip", "siglip"])
def test_tower_activations_are_what_autograd_keeps(tower):
    """A VLM keeps the tower's tokens (its pooled feature is dropped), CLIP the pooled feature."""
    from tessera.multimodal.clip import CLIP
    from tessera.multimodal.vlm import VLM

    text, images = TEXTS[0], 3
    pixels = torch.randn(images, 3, tower.image_size, tower.image_size)
    vlm = VLM(tower, text, VLMConfig(freeze=("none",)))
    kept, _ = kept_bytes(vlm, lambda: vlm.encode_images(pixels))
    assert image_side(Vision(tower, "prefix"), text, images, 20, "none", 2, 4).activations == kept
    clip = CLIP(tower, text, ClipConfig(embed_dim=12))
    kept, _ = kept_bytes(clip, lambda: clip.encode_image(pixels))
    est = image_side(Vision(tower, "clip", embed_dim=12), text, images, 20, "none", 2, 4).activations
    assert abs(est - kept) <= images * (tower.d_model + text.d_model) * 4  # the features before normalisation


def test_image_side_is_replicated_under_tp_and_sharded_by_fsdp():
    text, tower = load_config(overrides=["--model.preset=llama-8b"]).model, VisionConfig(
        image_size=336, patch_size=14, n_layers=24, n_heads=16, d_model=1024, d_ff=4096)
    side = Vision(tower, "prefix", frozen=("vision",))
    image = sum(count_image_params(side, text).values())
    lm = count_params(text)["total"]

    def params(gpus: int, **layout) -> float:  # parameters per rank (fp32 shards of FSDP2)
        with_images = plan(text, gpus, 80, 2048, 1, Layout(**layout), vision=side).params / 4
        return with_images - plan(text, gpus, 80, 2048, 1, Layout(**layout)).params / 4

    assert params(1) == pytest.approx(image)
    for tp in (2, 4, 8):  # the LM's share shrinks with tp, the image side's does not
        assert params(tp, tp=tp) == pytest.approx(image)
        lm_only = plan(text, tp, 80, 2048, 1, Layout(tp=tp)).params
        assert lm_only < plan(text, 1, 80, 2048, 1, Layout()).params / tp * 1.01
    assert params(8, dp_shard=8) == pytest.approx(image / 8)
    assert params(16, dp_shard=2, tp=8) == pytest.approx(image / 2)
    est = plan(text, 8, 80, 2048, 1, Layout(tp=8), vision=side)
    assert any("replicated on every TP rank" in note for note in est.notes)
    # frozen tower: no gradients or optimizer state; trained: both
    trained = Vision(tower, "prefix")
    frozen_est, trained_est = (plan(text, 1, 80, 2048, 1, Layout(), vision=v) for v in (side, trained))
    tower_n = count_image_params(side, text)["vision"]
    assert trained_est.optimizer - frozen_est.optimizer == pytest.approx(8 * tower_n)
    assert trained_est.grads - frozen_est.grads == pytest.approx(4 * tower_n)
    assert lm + image > 8.3e9


def test_prefix_image_tokens_lengthen_the_decoder_sequence():
    text, tower = ModelConfig(**TEXT, max_seq_len=1024), VisionConfig(**VISION)
    frozen = Vision(tower, "prefix", images=2, frozen=("vision", "projector"))  # nothing saved on the image side
    with_images = plan(text, 1, 80, 384, 2, Layout(), vision=frozen)
    longer = plan(text, 1, 80, 512, 2, Layout())
    assert with_images.activations == longer.activations and with_images.loss_buffers == longer.loss_buffers
    cross = plan(text, 1, 80, 384, 2, Layout(), vision=Vision(tower, "cross_attention", images=2, frozen=("vision",)))
    assert cross.loss_buffers == plan(text, 1, 80, 384, 2, Layout()).loss_buffers
    assert cross.compute_s > plan(text, 1, 80, 384, 2, Layout()).compute_s
    with pytest.raises(ValueError, match="fusion='late' is not valid"):
        plan(text, 1, 80, 384, 2, Layout(), vision=Vision(tower, "late"))


def test_plan_sizes_a_vlm_config(capsys):
    from tessera.cli.main import main

    config = str(ROOT / "configs/recipes/scenes_vlm/train.toml")
    assert main(["plan", "--config", config, "--gpus", "2", "--model.vocab_size=40"]) == 0
    out = capsys.readouterr().out
    assert ("vlm prefix: 1 image(s) of 16 tokens per sample, seq 64 = 48 text + 16 image positions, "
            "micro-batch 32") in out
    assert "frozen: vision, lm" in out and "fsdp r1 s2 tp1 ac=none bf16" in out
    assert main(["plan", "--config", str(ROOT / "configs/clip_scenes.toml"), "--gpus", "1", "--model.vocab_size=40",
                 "--micro-batch", "8"]) == 0
    assert "clip: 1 image(s) of 16 tokens per sample, seq 48, micro-batch 8" in capsys.readouterr().out
    assert main(["plan", "--config", config, "--gpus", "2"]) == 2
    assert "model.vocab_size" in capsys.readouterr().err
    assert main(["plan", "--config", config, "--model", "llama-8b", "--gpus", "2", "--model.vocab_size=40"]) == 2
    assert main(["plan", "--model", "llama-8b", "--gpus", "8", "--seq", "8192", "--model.vocab_size=40"]) == 2
    assert "--config" in capsys.readouterr().err


if __name__ == "__main__":
    t0 = time.time()
    peak = measure_vlm(sys.argv[1])
    print(f"{time.time() - t0:.1f}s", peak)
