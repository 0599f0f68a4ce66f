"""CLIP: the retrieval metrics against brute force, the contrastive loss and its gradients against a
float64 closed form, 2 ranks (FSDP2; DeepSpeed ZeRO 2/3, slow) against one process, and `tessera
clip` through the one trainer (evaluation metrics, exact resume, clear errors)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera.cli.main import main
from tessera.core.build import build_trainer
from tessera.core.config import ClipConfig, ModelConfig, VisionConfig, load_config
from tessera.core.metrics import read_metrics
from tessera.core.tokenizer import train_char
from tessera.multimodal.clip import CLIP, contrastive_loss
from tessera.core.data import DataError
from tessera.multimodal.clip_task import CLIPTask, caption_id, clip_config
from tessera.multimodal.retrieval import recall_at_k, zero_shot_accuracy

TESTS = Path(__file__).resolve().parent


def test_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(23, 17))
    relevant = rng.random((23, 17)) < 0.1
    relevant[3] = False  # a query with no right answer is never found
    got = recall_at_k(torch.tensor(sim), torch.tensor(relevant), ks=(1, 2, 5, 10, 40))
    for k, value in got.items():
        found = [relevant[q][np.argsort(-sim[q])[:k]].any() for q in range(23)]
        assert value.item() == pytest.approx(np.mean(found), abs=1e-6)  # a float32 mean of 0/1 values


def test_zero_shot_accuracy_matches_brute_force():
    rng = np.random.default_rng(1)
    image, classes, labels = rng.normal(size=(19, 6)), rng.normal(size=(4, 6)), rng.integers(0, 4, 19)
    expected = np.mean([np.argmax(classes @ image[i]) == labels[i] for i in range(19)])
    got = zero_shot_accuracy(torch.tensor(image), torch.tensor(classes), torch.tensor(labels))
    assert got.item() == pytest.approx(expected)


def test_contrastive_loss_and_gradients_match_the_closed_form():
    """Loss: mean of both directions' cross-entropies; gradient of the i2t logits softmax - onehot."""
    g = torch.Generator().manual_seed(0)
    n, d, s = 7, 5, 3.7
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    loss = contrastive_loss(image, text, torch.tensor(s, dtype=torch.float64))
    loss.backward()
    i, t = image.detach().numpy(), text.detach().numpy()
    logits = s * i @ t.T

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_rows, p_cols = softmax(logits), softmax(logits.T)
    expected = -(np.log(np.diag(p_rows)).mean() + np.log(np.diag(p_cols)).mean()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    g_rows, g_cols = (p_rows - np.eye(n)) / n, (p_cols - np.eye(n)) / n
    np.testing.assert_allclose(image.grad.numpy(), s * (g_rows @ t + g_cols.T @ t) / 2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(text.grad.numpy(), s * (g_rows.T @ i + g_cols @ i) / 2, rtol=1e-10, atol=1e-12)


def test_identical_captions_are_right_answers_for_each_other():
    """With caption ids, a row's loss is -log of the softmax mass on every column of its caption and
    the gradient of its logits softmax minus the softmax restricted to those columns."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([3, 0, 3, 5, 0, 3, 7, 1, 9])
    n, d, s = len(ids), 6, 5.3
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    loss = contrastive_loss(image, text, torch.tensor(s, dtype=torch.float64), ids)
    loss.backward()
    i, t, same = image.detach().numpy(), text.detach().numpy(), (ids[:, None] == ids[None, :]).numpy()
    logits = s * i @ t.T

    def row_terms(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        q = np.where(same, e, 0) / np.where(same, e, 0).sum(axis=1, keepdims=True)
        return -np.log((p * same).sum(axis=1)).mean(), (p - q) / n

    (l_rows, g_rows), (l_cols, g_cols) = row_terms(logits), row_terms(logits.T)
    assert loss.item() == pytest.approx((l_rows + l_cols) / 2, rel=1e-12)
    np.testing.assert_allclose(image.grad.numpy(), s * (g_rows @ t + g_cols.T @ t) / 2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(text.grad.numpy(), s * (g_rows.T @ i + g_cols @ i) / 2, rtol=1e-10, atol=1e-12)
    unique = contrastive_loss(image.detach(), text.detach(), torch.tensor(s, dtype=torch.float64), torch.arange(n))
    assert unique.item() > loss.item() + 0.05  # as separate captions, the duplicates are negatives


def test_hard_negatives_are_extra_columns_of_the_image_side():
    """Negative captions join the image->text softmax as columns (right answers where their caption is
    the row's own); the text->image side keeps the batch's images only."""
    g = torch.Generator().manual_seed(2)
    ids, negative_ids = torch.tensor([4, 1, 4, 6, 2]), torch.tensor([8, 1, 9, 6, 7, 4, 5, 3])
    n, m, d, s = len(ids), len(negative_ids), 7, 4.1
    image, text, negatives = (F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
                              for k in (n, n, m))
    loss = contrastive_loss(image, text, torch.tensor(s, dtype=torch.float64), ids, negatives, negative_ids)
    loss.backward()
    i, t, neg = (x.detach().numpy() for x in (image, text, negatives))
    columns, column_ids = np.concatenate([t, neg]), np.concatenate([ids.numpy(), negative_ids.numpy()])

    def term(logits, right):
        return -np.log((np.exp(logits) * right).sum(axis=1) / np.exp(logits).sum(axis=1)).mean()

    expected = (term(s * i @ columns.T, ids.numpy()[:, None] == column_ids[None, :])
                + term(s * t @ i.T, (ids[:, None] == ids[None, :]).numpy())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    eps = 1e-6  # the negatives' gradient, by central differences of the closed form
    bump = np.zeros_like(neg)
    bump[5, 2] = eps
    up, down = (np.concatenate([t, neg + sign * bump]) for sign in (1, -1))
    numeric = (term(s * i @ up.T, ids.numpy()[:, None] == column_ids[None, :])
               - term(s * i @ down.T, ids.numpy()[:, None] == column_ids[None, :])) / 2 / (2 * eps)
    assert negatives.grad[5, 2].item() == pytest.approx(numeric, rel=1e-6)


def tiny_clip(**vision) -> CLIP:
    torch.manual_seed(0)
    return CLIP(VisionConfig(image_size=8, patch_size=4, n_layers=1, n_heads=2, d_model=16, **vision),
                ModelConfig(vocab_size=20, n_layers=1, n_heads=2, d_model=16, max_seq_len=10), ClipConfig(embed_dim=8))


def test_each_distinct_caption_is_encoded_once_with_the_same_loss_and_gradients():
    """The objective runs the text tower on each distinct caption of the batch (negatives included)
    once; loss and gradients are those of encoding every row (float64)."""
    from tessera.multimodal.clip import clip_objective

    model = tiny_clip().double()
    g = torch.Generator().manual_seed(3)
    texts, lengths = torch.randint(0, 20, (6, 10), generator=g), torch.randint(1, 11, (6,), generator=g)
    captions, negatives = torch.tensor([3, 0, 3, 1, 0]), torch.tensor([2, 1, 5, 4, 1, 2, 0, 5, 4, 3])
    batch = {"pixel_values": torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64),
             "input_ids": texts[captions], "lengths": lengths[captions], "caption_ids": captions,
             "negative_input_ids": texts[negatives], "negative_lengths": lengths[negatives],
             "negative_caption_ids": negatives}
    seen = []
    handle = model.text_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    loss, _ = clip_objective(model, batch)
    loss.backward()
    handle.remove()
    assert seen == [6]
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    image, text, scale = model(batch["pixel_values"], torch.cat([texts[captions], texts[negatives]]),
                               torch.cat([lengths[captions], lengths[negatives]]))
    expected = contrastive_loss(image, text[:5], scale, captions, text[5:], negatives)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_text_feature_is_the_last_token_of_the_caption():
    model = tiny_clip()
    ids = torch.randint(0, 20, (2, 10))
    lengths = torch.tensor([4, 7])
    base = model.encode_text(ids, lengths)
    padded = ids.clone()
    padded[0, 4:], padded[1, 7:] = 0, 0  # whatever follows the caption is ignored
    torch.testing.assert_close(model.encode_text(padded, lengths), base, rtol=0, atol=0)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 20  # its first token is seen
    assert not torch.allclose(model.encode_text(changed, lengths)[0], base[0])
    torch.testing.assert_close(base.norm(dim=-1), torch.ones(2))


def test_logit_scale_starts_at_the_temperature_and_is_capped():
    model = tiny_clip()
    _, _, scale = model(torch.randn(1, 3, 8, 8), torch.zeros(1, 10, dtype=torch.long), torch.tensor([3]))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(torch.randn(1, 3, 8, 8))[2].item() == pytest.approx(100.0, rel=1e-6)


def two_ranks(out: Path, *layouts: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "clip_worker.py"), str(out), *layouts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


def assert_matches_one_process(result: dict, layout: str) -> None:
    """Each rank scores its 3 rows against all 6 columns; mean loss and averaged gradients equal one
    process's. float32 sums of a few hundred terms in another order differ by ~1e-7 relative; 1e-5 of
    each tensor's largest gradient leaves room for that and catches a missing or doubled term (~10%)."""
    ref, got = result["reference"], result[layout]
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    assert ref["grads"].keys() == got["grads"].keys()
    for name, grad in ref["grads"].items():
        # the key biases' true gradient is 0 (softmax ignores them): compared on the model's scale
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=f"{layout} {name}")
    assert got["eval"].item() == pytest.approx(ref["eval"].item(), rel=1e-5)  # after one AdamW step
    assert got["metrics"].keys() == ref["metrics"].keys() >= {"i2t_r1", "t2i_r5", "i2t_r10", "zero_shot_acc"}
    for key, value in ref["metrics"].items():
        assert got["metrics"][key].item() == pytest.approx(value.item(), rel=1e-5), key


def test_two_fsdp_ranks_equal_one_process_on_the_global_batch(tmp_path):
    assert_matches_one_process(two_ranks(tmp_path / "clip.pt", "fsdp"), "fsdp")


@pytest.mark.slow  # DeepSpeed's start-up (and, once, the build of its CPU op: ~95 s)
def test_zero_stages_equal_one_process_on_the_global_batch(tmp_path):
    pytest.importorskip("deepspeed")
    result = two_ranks(tmp_path / "clip.pt", "zero2", "zero3")
    for layout in ("zero2", "zero3"):
        assert_matches_one_process(result, layout)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def write_folder(root: Path, n: int, seed: int) -> Path:
    """`n` tiny noisy PNGs of one colour each, captioned and labelled by it (the synth-scenes layout)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        label = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:04d}.png")
        rows.append({"image": f"{i:04d}.png", "caption": f"a {label} square", "label": label})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tokenizer = train_char(["a photo of a red green blue yellow square"]).save(root / "tok")
    return write_folder(root / "train", 32, 0), write_folder(root / "val", 8, 1), tokenizer


def clip_args(clip_data, run_dir, *extra) -> list[str]:
    train, val, tokenizer = clip_data
    return [f"--data.path={json.dumps(str(train))}", f"--clip.val_path={json.dumps(str(val))}",
            f"--data.tokenizer={json.dumps(str(tokenizer))}", f"--train.run_dir={json.dumps(str(run_dir))}",
            "--vision.image_size=8", "--vision.patch_size=4", "--vision.n_layers=1", "--vision.d_model=16",
            "--vision.n_heads=2", "--model.n_layers=1", "--model.d_model=16", "--model.n_heads=2",
            "--model.max_seq_len=24", "--train.seq_len=24", "--train.batch_size=8", "--train.steps=6",
            "--optim.warmup_steps=1", "--optim.lr=3e-3", "--log.every=1", "--eval.every=3", "--checkpoint.every=0",
            "--log.progress=false", "--log.tensorboard=false", "--clip.embed_dim=8", *extra]


def make(clip_data, run_dir, *extra):
    cfg = clip_config(load_config(None, clip_args(clip_data, run_dir, *extra)))
    return build_trainer(cfg, task=CLIPTask(cfg))[1]


def logged(run_dir: Path, key: str) -> list:
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


def test_clip_trains_evaluates_and_resumes_exactly(clip_data, tmp_path, one_thread):
    full = make(clip_data, tmp_path / "full")
    final = full.fit()
    for key in ("val_loss", "val_i2t_r1", "val_i2t_r5", "val_i2t_r10", "val_t2i_r1", "val_zero_shot_acc",
                "val_logit_scale"):
        assert key in final, key
    assert logged(tmp_path / "full", "val_i2t_r1")[0][0] == 0  # the step-0 baseline
    assert final["val_i2t_r10"] == 1.0  # 4 distinct captions: any 10 include the right one
    part = make(clip_data, tmp_path / "part")
    part.fit(stop_at=3)
    resumed = make(clip_data, tmp_path / "part", "--checkpoint.resume=auto")
    assert resumed.step == 3
    resumed.fit()
    assert logged(tmp_path / "part", "loss") == logged(tmp_path / "full", "loss")
    assert logged(tmp_path / "part", "val_t2i_r1") == logged(tmp_path / "full", "val_t2i_r1")
    keys = full.engine.model.state_dict().keys()
    assert {"vision.patch_emb.weight", "text.tok_emb.weight", "image_proj.weight", "logit_scale"} <= set(keys)
    for (name, a), b in zip(full.engine.model.state_dict().items(), resumed.engine.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("breakage,message", [
    ("no_captions", "must be a folder with captions.jsonl"),
    ("not_an_image", "0003.png: not an image Pillow can read"),
    ("bad_row", "captions.jsonl:1: a row must be"),
    ("not_json", "captions.jsonl:2: not JSON"),
    ("empty_image", "0005.png: empty file (0 bytes)"),
    ("missing_image", "0006.png cannot be read as an image"),
])
def test_bad_data_is_one_clear_line(clip_data, tmp_path, capsys, breakage, message):
    train = write_folder(tmp_path / "data", 8, 2)
    if breakage == "no_captions":
        (train / "captions.jsonl").unlink()
    elif breakage == "not_an_image":
        (train / "images" / "0003.png").write_bytes(b"not a png")
    elif breakage == "bad_row":
        (train / "captions.jsonl").write_text('{"image": "0000.png"}\n')
    elif breakage == "not_json":
        (train / "captions.jsonl").write_text('{"image": "0000.png", "caption": "a"}\n{oops\n')
    elif breakage == "empty_image":
        (train / "images" / "0005.png").write_bytes(b"")
    else:
        (train / "images" / "0006.png").unlink()
    config = tmp_path / "clip.toml"
    config.write_text("")
    args = clip_args((train, clip_data[1], clip_data[2]), tmp_path / "run")
    assert main(["clip", str(config), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_tensor_parallel_is_refused(clip_data, tmp_path):
    cfg = load_config(None, clip_args(clip_data, tmp_path, "--parallel.tp=2"))
    with pytest.raises(Exception, match="parallel.tp=2"):
        CLIPTask(cfg).check(cfg, None)


def test_vision_tower_from_hugging_face(clip_data, tmp_path):
    """`vision.init_from = "hf:DIR"` gives the run the tower's architecture (and image normalisation) and
    weights: the built model's image features are the SigLIP tower's pooled output."""
    from test_multimodal_vision import hf_tower

    reference = hf_tower("siglip", True, tmp_path / "hf")
    trainer = make(clip_data, tmp_path / "run", f"--vision.init_from={json.dumps('hf:' + str(tmp_path / 'hf'))}")
    vision = trainer.cfg.vision
    assert (vision.pool, vision.image_size, vision.d_model, vision.activation) == ("map", 20, 32, "gelu_tanh")
    pixels = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(trainer.engine.model.vision(pixels)[1], reference(pixel_values=pixels).pooler_output,
                                   atol=1e-4, rtol=1e-4)


def test_the_scenes_recipe_is_a_valid_config():
    cfg = load_config(TESTS.parent / "configs" / "clip_scenes.toml")
    assert (cfg.clip.val_path, cfg.vision.pool, cfg.train.seq_len) == ("data/scenes/val", "mean", 48)


def test_clip_streams_image_shards_and_resumes_exactly(clip_data, tmp_path, one_thread):
    """data.path made by `prepare-images`: the shard loader's batches, its val split for evaluation
    (Recall@K within each batch), and a resumed run that replays the uninterrupted one."""
    from tessera.multimodal.image_shards import prepare_images

    train, _, tokenizer = clip_data
    shards = tmp_path / "shards"
    prepare_images(train / "images", train / "captions.jsonl", shards, val_fraction=0.25, shard_samples=4)
    args = [f"--data.path={json.dumps(str(shards))}", "--clip.val_path=''", "--train.batch_size=4", "--eval.batches=2"]
    full = make(clip_data, tmp_path / "full", *args)
    final = full.fit()
    assert {"val_loss", "val_i2t_r1", "val_t2i_r5"} <= final.keys() and "val_zero_shot_acc" not in final
    part = make(clip_data, tmp_path / "part", *args)
    part.fit(stop_at=3)
    resumed = make(clip_data, tmp_path / "part", "--checkpoint.resume=auto", *args)
    resumed.fit()
    assert logged(tmp_path / "part", "loss") == logged(tmp_path / "full", "loss")
    assert logged(tmp_path / "part", "val_i2t_r1") == logged(tmp_path / "full", "val_i2t_r1")


def with_negatives(folder: Path, count: int) -> Path:
    """`folder`'s captions, each row listing `count` hard negatives: the captions of the other colours."""
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    for row in rows:
        row["negatives"] = [f"a {c} square" for c in COLOURS if c != row["label"]][:count]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_hard_negatives_come_with_their_captions(clip_data, tmp_path, source):
    """clip.negatives > 0: each caption's first hard negatives, read from the folder's rows or carried
    by the shards, reach the batch in row order, and the run trains on them."""
    from tessera.multimodal.image_shards import prepare_images, read_image_manifest

    train = with_negatives(write_folder(tmp_path / "data", 12, 3), 3)
    data = train
    if source == "shards":
        data = tmp_path / "shards"
        prepare_images(train / "images", train / "captions.jsonl", data, val_fraction=0.0, shard_samples=4)
        assert read_image_manifest(data).negatives == 3
    trainer = make((data, clip_data[1], clip_data[2]), tmp_path / "run", "--clip.negatives=2", "--train.batch_size=4",
                   "--train.steps=2", "--eval.every=0")
    batch = next(iter(trainer.parts.train_loader))
    colour = {caption_id(f"a {c} square"): c for c in COLOURS}
    captions = [colour[int(i)] for i in batch["caption_ids"]]
    expected = [f"a {c} square" for row in captions for c in [c for c in COLOURS if c != row][:2]]
    assert batch["negative_caption_ids"].tolist() == [caption_id(t) for t in expected]
    assert batch["negative_input_ids"].shape == (8, 24)
    assert batch["negative_lengths"].tolist() == [len(t) + 1 for t in expected]  # a character a token, and eos
    assert trainer.fit()["loss"] > 0


def test_too_few_hard_negatives_is_one_clear_line(clip_data, tmp_path, capsys):
    from tessera.multimodal.image_shards import prepare_images

    train = with_negatives(write_folder(tmp_path / "data", 8, 2), 1)
    shards = tmp_path / "shards"
    prepare_images(train / "images", train / "captions.jsonl", shards, val_fraction=0.0, shard_samples=4)
    config = tmp_path / "clip.toml"
    config.write_text("")
    for data, message in ((train, "captions.jsonl:1: clip.negatives=2 needs a list of at least 2 hard-negative"),
                          (shards, "clip.negatives=2: the captions of data.path")):
        args = clip_args((data, clip_data[1], clip_data[2]), tmp_path / "run", "--clip.negatives=2")
        assert main(["clip", str(config), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # a shard whose json was written by hand: one list of negatives per caption, each of captions
    from tessera.multimodal.image_loader import ImageTextLoader
    from tessera.multimodal.image_shards import read_image_manifest
    from tessera.multimodal.images import preset

    loader = ImageTextLoader(read_image_manifest(shards), "train", 2, preset("clip", 32))
    png = (train / "images" / "0000.png").read_bytes()
    for negatives, message in (([["a"], ["b"]], "one list per caption"), ("a", "one list per caption"),
                               ([[""]], "must be a list of non-empty captions")):
        text = json.dumps({"image": "0000.png", "captions": ["a red square"], "negatives": negatives}).encode()
        with pytest.raises(DataError, match=message):
            loader._decode({"__key__": "k", "png": png, "json": text}, "shard key k")
    (train / "captions.jsonl").write_text('{"image": "0000.png", "caption": "a", "negatives": "b"}\n')
    with pytest.raises(DataError, match=r"captions.jsonl:1: \"negatives\" must be a list"):
        prepare_images(train / "images", train / "captions.jsonl", tmp_path / "bad")
