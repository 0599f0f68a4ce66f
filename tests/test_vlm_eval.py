"""Generation and evaluation of the image-conditioned LM: CIDEr-D against values worked out by hand,
batched cached generation against one prompt at a time recomputed from scratch, and `tessera
generate --image` / `tessera eval captions | vqa` on a checkpoint of `tessera vlm`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tessera.cli.main import main
from tessera.core.generate import Sampling
from tessera.core.tokenizer import train_char
from tessera.multimodal.cider import cider_d
from tessera.multimodal.text_tokens import encode_with_images
from tessera.multimodal.vlm_eval import meteor
from tessera.multimodal.vlm_inference import generate_with_images
from test_vlm import scene_data, tiny, vlm_args  # noqa: F401  (scene_data is a fixture)


def test_cider_d_matches_hand_computed_values():
    """Two images, so idf = log 2 for an n-gram of one reference set (and for one of none: df is
    floored at 1). Image 1: unigrams cos = 1, bigram cos = 1, no 3/4-grams: 10 * 2/4 = 5. Image 2:
    "c e" vs "c d": unigram cos = log2^2 / (sqrt2 log2)^2 = 1/2, bigram 0: 10 * 0.5/4 = 1.25."""
    corpus, scores = cider_d(["a b", "c e"], [["a b"], ["c d"]])
    assert scores == pytest.approx([5.0, 1.25], rel=1e-12)
    assert corpus == pytest.approx(3.125, rel=1e-12)
    # lengths 2 vs 3: unigram 2/sqrt6, bigram 1/sqrt2, times exp(-1/(2*36)); punctuation and case dropped
    _, scores = cider_d(["A b.", "c d"], [["a b x"], ["c d", "C, D"]])
    assert scores[0] == pytest.approx(10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4, rel=1e-12)
    assert scores[1] == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="one of each per image"):
        cider_d(["a"], [["a"], ["b"]])


def test_meteor_matches_hand_computed_values():
    """METEOR = Fmean (1 - 0.5 (chunks / matches)^3), Fmean = P R / (0.9 P + 0.1 R). "red circle" in a
    7-word reference: P = 1, R = 2/7, one chunk of 2. "circles above squares" against "a circle above a
    square": 3 matches (two by stem), P = 1, R = 3/5, chunks (circle above)(square) = 2. The best
    reference counts; case and a final full stop are dropped."""
    def by_hand(p, r, chunks, matches):
        return p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (chunks / matches) ** 3)

    assert meteor(["red circle"], [["a red circle above a blue square"]]) == pytest.approx(by_hand(1, 2 / 7, 1, 2), rel=1e-12)
    assert meteor(["Circles above squares."], [["a circle above a square"]]) == pytest.approx(by_hand(1, 3 / 5, 2, 3), rel=1e-12)
    assert meteor(["red circle", "blue"], [["green", "red circle"], ["red"]]) == pytest.approx(
        (by_hand(1, 1, 1, 2) + 0) / 2, rel=1e-12)
    assert meteor([""], [["a red circle"]]) == 0.0  # an empty caption (eos at once) scores 0, not an error


def reference_greedy(model, tok, prompt: str, pixels: torch.Tensor, steps: int) -> list[int]:
    """One prompt, no cache, no padding: the whole sequence recomputed for every new token."""
    ids, flags = encode_with_images(tok, prompt, pixels.shape[0], model.image_tokens)
    out = []
    for _ in range(steps):
        mask = torch.tensor([flags + [False] * len(out)])
        logits = model(torch.tensor([ids + out]), pixels, mask if model.fusion == "prefix" else None)
        out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_batched_cached_generation_equals_one_prompt_at_a_time(fusion):
    tok = train_char(["abcdefghijklmn"])
    model = tiny(fusion, vocab_size=tok.vocab_size, max_seq_len=40).double().eval()
    if fusion == "cross_attention":
        with torch.no_grad():
            for layer in model.cross:
                layer.attn_gate.fill_(0.7)
                layer.mlp_gate.fill_(-0.4)
    g = torch.Generator().manual_seed(3)
    prompts = ["ab<image>cde", "<image>f"] if fusion == "prefix" else ["ab<image>cde", "f<image>"]
    pixels = [torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64) for _ in prompts]
    expected = [reference_greedy(model, tok, p, x, 6) for p, x in zip(prompts, pixels)]
    for use_cache in (True, False):
        got = [[], []]
        for step in generate_with_images(model, tok, prompts, pixels, 6, Sampling(temperature=0), use_cache=use_cache):
            for seq, t in zip(got, step):
                if t is not None:
                    seq.append(t)
        for seq, ref in zip(got, expected):  # a sequence stops at eos
            assert seq == ref[:len(seq)] and (len(seq) == 6 or seq[-1] == tok.eos_id), (use_cache, seq, ref)
    steps = list(generate_with_images(model, tok, prompts, pixels, 100, Sampling(temperature=0)))
    assert len(steps) <= 40 - (2 + model.image_tokens + 3)  # the longest prompt "ab<image>cde": ends with the context
    with pytest.raises(ValueError, match="fills the model's context of 40"):
        next(generate_with_images(model, tok, ["a" * 40 + "<image>"], pixels[:1], 4))


def test_generate_and_eval_a_vlm_checkpoint(scene_data, tmp_path, capsys, one_thread):
    config = tmp_path / "vlm.toml"
    config.write_text("")
    run = tmp_path / "run"
    assert main(["vlm", str(config), *vlm_args(scene_data, run, "--train.steps=2", "--vlm.stage=\"instruct\"",
                                               f"--data.path={json.dumps(str(scene_data[1]))}")]) == 0
    scenes = scene_data[0].parent / "scenes"
    capsys.readouterr()
    image = str(scenes / "images" / "000000.png")
    assert main(["generate", "--ckpt", str(run), "--image", image, "--prompt", "what colour is it?",
                 "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["eval", "vqa", "--ckpt", str(run), "--data", str(scenes), "--max-images", "2", "--device", "cpu"]) == 0
    vqa = json.loads(capsys.readouterr().out)
    assert vqa["questions"] >= 2 and 0 <= vqa["accuracy"] <= 1
    assert main(["eval", "captions", "--ckpt", str(run), "--data", str(scenes), "--max-images", "3",
                 "--device", "cpu"]) == 0
    captions = json.loads(capsys.readouterr().out)
    assert captions["images"] == 3 and {"exact_match", "cider_d", "meteor", "bleu", "rougeL"} <= captions.keys()
    assert main(["generate", "--ckpt", str(run), "--image", image, "--prompt", "<image><image>", "--device", "cpu"]) == 2
    assert "2 <image> marker(s) for 1 image(s)" in capsys.readouterr().err
    # the text part converts to Hugging Face as any decoder does
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2


def test_eval_retrieval_of_a_clip_checkpoint(scene_data, tmp_path, capsys, one_thread):  # noqa: F811
    scenes = scene_data[0].parent / "scenes"
    config = tmp_path / "clip.toml"
    config.write_text("")
    args = [f"--data.path={json.dumps(str(scenes))}", f"--data.tokenizer={json.dumps(str(scene_data[2]))}",
            f"--train.run_dir={json.dumps(str(tmp_path / 'clip'))}", "--vision.image_size=8", "--vision.patch_size=4",
            "--vision.n_layers=1", "--vision.d_model=16", "--vision.n_heads=2", "--model.n_layers=1",
            "--model.d_model=16", "--model.n_heads=2", "--model.max_seq_len=48", "--train.seq_len=48",
            "--train.batch_size=8", "--train.steps=2", "--log.progress=false", "--log.tensorboard=false",
            "--eval.every=0", "--clip.embed_dim=8", "--train.device=cpu"]
    assert main(["clip", str(config), *args]) == 0
    capsys.readouterr()
    assert main(["eval", "retrieval", "--ckpt", str(tmp_path / "clip"), "--data", str(scenes), "--batch-size", "20",
                 "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["pairs"] == 48 and 0 <= got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"] <= 1
    assert main(["eval", "retrieval", "--ckpt", str(tmp_path / "clip"), "--data", str(tmp_path), "--device", "cpu"]) == 2
