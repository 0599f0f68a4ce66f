"""LoRA instruction tuning of the image-conditioned LM (`tessera vlm --lora.r`): the adapters' first
gradients against the merged weights W + scale * B @ A differentiated in float64, only adapters and
projector moving while the LM's base weights stay bit-identical, exact resume, and the checkpoint
(with its adapters, and its merged/ export) in generate, eval and serve with the trained logits."""
from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

from tessera.cli.interop import vision_model_for_serving
from tessera.cli.main import main
from tessera.core.build import build_trainer, with_vocab
from tessera.core.config import load_config
from tessera.core.lora import LoRALinear
from tessera.multimodal.vlm import VLM
from tessera.multimodal.vlm_inference import export_lora, load_vlm
from tessera.multimodal.vlm_task import VLMTask
from test_vlm import assert_resume_replays, scene_data, vlm_args  # noqa: F401  (scene_data is a fixture)

LORA = ["--vlm.stage=\"instruct\"", "--lora.r=2", "--lora.alpha=3.0"]


def lora_args(data, run_dir, *extra) -> list[str]:
    return vlm_args(data, run_dir, f"--data.path={json.dumps(str(data[1]))}", *LORA, *extra)


def make(data, run_dir, *extra):
    cfg = load_config(None, lora_args(data, run_dir, *extra))
    return build_trainer(cfg, task=VLMTask(cfg))[1]


def test_first_gradients_match_the_merged_weights_in_float64(scene_data, tmp_path):
    """The task's model (cross-attention, gates open, B nonzero) on a real batch of its loader, against
    the plain VLM run through W + scale * B @ A with A, B, the projector and the cross-attention
    layers as the leaves. Both are float64 and differ only in the order of the sums (~1e-15)."""
    cfg = load_config(None, lora_args(scene_data, tmp_path, "--vlm.fusion=\"cross_attention\""))
    task = VLMTask(cfg)
    cfg = with_vocab(cfg, task.vocab_size, console=False)
    torch.manual_seed(0)
    model = task.build_model(cfg, torch.device("cpu"), None).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name or name.endswith("_gate"):
                p.normal_(0.0, 0.3)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert all(n.startswith("lm.") for n in adapted) and len(adapted) == 6 * cfg.model.n_layers  # GELU MLP: no gate
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"lm", "projector", "cross"}
    assert all(".lora_" in n for n in trained if n.startswith("lm."))
    batch = next(iter(task.loaders(cfg, 0, 1)[0]))
    batch["pixel_values"] = batch["pixel_values"].double()
    loss = task.objective(model, batch)[0]
    loss.backward()

    plain = VLM(cfg.vision, cfg.model, cfg.vlm).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    leaves = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: leaves.get(n, p.detach()) for n, p in model.named_parameters() if ".lora_" not in n}
    for name, m in adapted.items():
        params[f"{name}.weight"] = m.weight + m.scale * leaves[f"{name}.lora_b"] @ leaves[f"{name}.lora_a"]
    ref = functional_call(plain, params, (batch["input_ids"], batch["pixel_values"], batch["image_mask"],
                                          batch["targets"]))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for name, leaf in leaves.items():
        grad = dict(model.named_parameters())[name].grad
        assert leaf.grad.abs().max() > 0, name
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-9, atol=1e-12 * leaf.grad.abs().max().item(), msg=name)


def test_adapters_and_projector_train_the_lm_stays_and_resume_is_exact(scene_data, tmp_path, one_thread):
    """Also: the checkpoint exports as merged/, which gives the trained model's logits within float32
    rounding of W + scale * B @ A (~1e-7 relative per weight, a few ulps more through two blocks:
    1e-5); the checkpoint itself, adapters and all, is refused by a plain VLM as the text path does."""
    full = make(scene_data, tmp_path / "full")
    before = {k: v.clone() for k, v in full.engine.model.state_dict().items()}
    full.fit()
    model = full.engine.model.eval()
    after = model.state_dict()
    for name, value in before.items():
        moved = name.startswith("projector.") or ".lora_" in name
        assert torch.equal(value, after[name]) != moved, name
    assert_resume_replays(make, scene_data, tmp_path, after)

    batch = next(iter(full.parts.val_loader))
    args = (batch["input_ids"], batch["pixel_values"], batch["image_mask"])
    with torch.no_grad():
        expected = model(*args)
        ckpt = full.parts.checkpointer.latest()
        with pytest.raises(ValueError, match="lora_a, ...\\): a LoRA run's checkpoint is read through its merged/"):
            load_vlm(ckpt)
        adapter, merged = export_lora(ckpt, tmp_path / "export")
        exported, cfg = load_vlm(merged)
        assert cfg.lora.r == 0 and not any(isinstance(m, LoRALinear) for m in exported.modules())
        torch.testing.assert_close(exported(*args), expected, rtol=1e-5, atol=1e-5)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2


def test_tessera_vlm_with_lora_exports_for_generate_eval_and_serve(scene_data, tmp_path, capsys, one_thread):
    config = tmp_path / "vlm.toml"
    config.write_text("")
    run = tmp_path / "run"
    assert main(["vlm", str(config), *lora_args(scene_data, run, "--train.steps=2")]) == 0
    assert "wrote adapters to" in capsys.readouterr().out
    image = str(scene_data[0].parent / "scenes" / "images" / "000000.png")
    generate = ["generate", "--image", image, "--prompt", "what colour is it?", "--max-new-tokens", "3",
                "--temperature", "0", "--device", "cpu", "--ckpt"]
    assert main([*generate, str(run / "merged")]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main([*generate, str(run)]) == 2  # the run's checkpoint holds the adapters
    assert "is read through its merged/ export" in capsys.readouterr().err
    assert main(["eval", "vqa", "--ckpt", str(run / "merged"), "--data", str(scene_data[0].parent / "scenes"),
                 "--max-images", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] >= 2
    lm, _, _, embedder = vision_model_for_serving(str(run / "merged"), "cpu")
    ids, embeds = embedder(["what colour? ", (scene_data[0].parent / "scenes" / "images" / "000000.png").read_bytes()])
    assert embeds.shape == (len(ids), lm.cfg.d_model)
