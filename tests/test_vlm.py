"""The image-conditioned LM: image tokens where the `<image>` markers stand (against the decoder fed
by hand), markers that do not match the images refused, cross-attention gates that leave the LM
unchanged at 0, the freeze rules of both stages, 2 ranks (FSDP2, TP, TP with sequence and loss
parallelism; DeepSpeed ZeRO 1/2/3, slow) against one process, activation checkpointing against
none, and `tessera vlm` through the one trainer (exact resume, clear errors)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlm_worker
from tessera.cli.main import main
from tessera.core.build import build_trainer
from tessera.core.config import ConfigError, ModelConfig, ParallelConfig, VisionConfig, VLMConfig, load_config
from tessera.core.metrics import read_metrics
from tessera.core.tokenizer import train_char
from tessera.distributed.mesh import ParallelDims
from tessera.distributed.parallelize import parallelize
from tessera.multimodal.image_shards import prepare_images
from tessera.multimodal.scenes import synth_scenes
from tessera.multimodal.text_tokens import IGNORE, PromptAnswerTokens, encode_with_images
from tessera.multimodal.vlm import VLM, set_trainable, vlm_objective
from tessera.multimodal.vlm_inference import load_vlm
from tessera.multimodal.vlm_task import VLMTask

TESTS = Path(__file__).resolve().parent
VISION = VisionConfig(image_size=8, patch_size=4, n_layers=1, n_heads=2, d_model=12)  # 4 patches + cls
TEXT = ModelConfig(vocab_size=19, n_layers=3, n_heads=2, d_model=16, max_seq_len=24)


def tiny(fusion: str = "prefix", **text) -> VLM:
    torch.manual_seed(0)
    return VLM(VISION, ModelConfig(**{**TEXT.__dict__, **text}), VLMConfig(fusion=fusion, cross_every=2))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_image_tokens_stand_where_the_markers_stand(pos):
    """Two images in one row, at odd places: the logits equal the decoder run on embeddings put
    together by hand (token embeddings, then each image's projected encoder tokens in place)."""
    model = tiny(pos=pos).double()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    t = model.image_tokens
    assert t == VISION.num_tokens == 5
    ids = torch.randint(0, 19, (2, 17), generator=g)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[0, 2:2 + t] = mask[0, 9:9 + t] = True  # row 0: images 0 and 1
    mask[1, 0:t] = True  # row 1: image 2
    got = model(ids, pixels, mask)
    feats = model.projector(model.vision(pixels)[0])
    rows = [torch.cat([model.lm.tok_emb(ids[0, :2]), feats[0], model.lm.tok_emb(ids[0, 7:9]), feats[1],
                       model.lm.tok_emb(ids[0, 14:])]),
            torch.cat([feats[2], model.lm.tok_emb(ids[1, t:])])]
    expected = model.lm(None, inputs_embeds=torch.stack(rows))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the token path of the decoder is the embeddings path fed the token embeddings
    torch.testing.assert_close(model.lm(ids), model.lm(None, inputs_embeds=model.lm.tok_emb(ids)), rtol=0, atol=0)


def test_markers_that_do_not_match_the_images_are_refused():
    tok = train_char(["abc? "])
    ids, flags = encode_with_images(tok, "ab<image>c", 1, 3)
    assert ids[:2] == tok.encode("ab") and flags == [False, False, True, True, True, False]
    with pytest.raises(ValueError, match="2 <image> marker\\(s\\) for 1 image"):
        encode_with_images(tok, "<image>a<image>", 1, 3)
    with pytest.raises(ValueError, match="0 <image> marker\\(s\\) for 1 image"):
        PromptAnswerTokens(tok, 20, prompt="{text}", image_tokens=3)({"texts": ["a?"], "answers": ["b"]})
    model = tiny()
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, :5] = True
    with pytest.raises(ValueError, match="5 image positions but 10 image tokens"):
        model(torch.zeros(1, 12, dtype=torch.long), torch.randn(2, 3, 8, 8), mask)
    with pytest.raises(ValueError, match="same number of images in every row"):
        tiny("cross_attention")(torch.zeros(2, 12, dtype=torch.long), torch.randn(3, 3, 8, 8))


def test_loss_falls_on_the_answer_only():
    tok = train_char(["what colour? red"])
    batch = PromptAnswerTokens(tok, 40, prompt="<image>{text}", image_tokens=4)(
        {"texts": ["what?", "colour?"], "answers": ["red", "d"]})
    ids, targets, image = batch["input_ids"], batch["targets"], batch["image_mask"]
    for row, (q, a) in enumerate((("what?", "red"), ("colour?", "d"))):
        start = 4 + len(tok.encode(q))
        assert image[row].tolist() == [True] * 4 + [False] * (ids.shape[1] - 4)
        answer = tok.encode(a) + [tok.eos_id]
        assert targets[row, start - 1:start - 1 + len(answer)].tolist() == answer
        assert (targets[row, :start - 1] == IGNORE).all() and (targets[row, start - 1 + len(answer):] == IGNORE).all()


def test_cross_attention_starts_as_the_lm_and_learns_through_its_gates():
    model = tiny("cross_attention")
    assert len(model.cross) == 2  # before blocks 0 and 2 of 3
    ids, pixels = torch.randint(0, 19, (2, 11)), torch.randn(4, 3, 8, 8)  # two images a row
    out = model(ids, pixels)
    torch.testing.assert_close(out, model.lm(ids), rtol=0, atol=0)
    out.square().mean().backward()
    for layer in model.cross:  # d tanh(g)/dg = 1 at 0: the gates get gradients, the layers behind them not yet
        assert layer.attn_gate.grad.abs().item() > 0 and layer.mlp_gate.grad.abs().item() > 0
        assert layer.wq.weight.grad.abs().max().item() == 0
    copied = copy.deepcopy(model)  # a copy hooks its own layers, not the original's
    with torch.no_grad():
        copied.cross[0].attn_gate.fill_(1.0)
    torch.testing.assert_close(model(ids, pixels), model.lm(ids), rtol=0, atol=0)
    assert not torch.allclose(copied(ids, pixels), model.lm(ids))


def test_freeze_rules_of_the_stages():
    for stage, trained in (("align", {"projector", "cross"}), ("instruct", {"projector", "cross", "lm"})):
        model = tiny("cross_attention")
        set_trainable(model, VLMConfig(stage=stage).frozen_parts)
        got = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
        assert got == trained, stage
    assert VLMConfig(stage="instruct", freeze=("none",)).frozen_parts == ()
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        VLMConfig(freeze=("vision", "projector", "lm"))
    with pytest.raises(ConfigError, match="'eyes' is no part"):
        VLMConfig(freeze=("eyes",))


def two_ranks(out: Path, *layouts: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "vlm_worker.py"), str(out), *layouts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """FSDP2 (plain and with LoRA), TP=2 and TP=2 with sequence and loss parallelism, in one launch."""
    return two_ranks(tmp_path_factory.mktemp("vlm_layouts") / "vlm.pt", "fsdp", "fsdp_lora", "tp", "tp_sp")


def assert_matches_one_process(runs: dict, layout: str) -> None:
    """Both fusions, every rank. float32 sums in another order differ by ~1e-7 relative; 1e-5 (of the
    largest gradient) leaves room for that and catches a missing or doubled term."""
    frozen, lora = vlm_worker.variant(layout)
    for fusion, ranks in runs[layout].items():
        ref = runs["reference"][fusion, frozen, lora]
        assert len(ranks) == 2
        assert any(n.startswith("vision.") for n in ref["grads"]) == ("vision" not in frozen)
        assert any(n.startswith("projector.") for n in ref["grads"])
        assert any(n.startswith("cross.") for n in ref["grads"]) == (fusion == "cross_attention")
        lm = [n for n in ref["grads"] if n.startswith("lm.")]
        assert lm and all(".lora_" in n for n in lm) == lora  # LoRA: the adapters train, not the LM
        scale = max(g.abs().max().item() for g in ref["grads"].values())
        for rank, got in enumerate(ranks):
            where = f"{layout} {fusion} rank {rank}"
            assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5), where
            assert ref["grads"].keys() == got["grads"].keys(), where
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-5 * scale,
                                           msg=f"{where} {name}")
            assert got["norm"].item() == pytest.approx(ref["norm"].item(), rel=1e-5), where
            assert got["eval"].item() == pytest.approx(ref["eval"].item(), rel=1e-5), where


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_lora", "tp", "tp_sp"])
def test_two_ranks_equal_one_process_on_the_global_batch(layouts, layout):
    """FSDP2 with the vision tower frozen (and with LoRA on the LM); TP (plain, and with sequence and
    loss parallelism) training every part: the replicated vision tower, projector and cross-attention layers get the
    one-process gradients on every TP rank."""
    assert_matches_one_process(layouts, layout)


@pytest.mark.slow  # DeepSpeed's start-up (and, once, the build of its CPU op: ~95 s)
def test_zero_stages_equal_one_process_on_the_global_batch(tmp_path):
    """ZeRO 1/2/3 with the vision tower frozen: gradients assembled from the partitions."""
    pytest.importorskip("deepspeed")
    runs = two_ranks(tmp_path / "vlm.pt", "zero1", "zero2", "zero3")
    for layout in ("zero1", "zero2", "zero3"):
        assert_matches_one_process(runs, layout)


@pytest.mark.parametrize("mode", ["full", "op"])
def test_activation_checkpointing_keeps_loss_and_gradients(mode):
    """One process, through `parallelize`: recomputing the decoder's blocks (and the cross-attention
    layers hooked on them) in backward runs the same float ops, so everything is equal exactly."""
    for fusion in ("prefix", "cross_attention"):
        model = vlm_worker.new_model(fusion, ())
        checkpointed = copy.deepcopy(model)
        parallelize(checkpointed, ParallelConfig(activation_checkpoint=mode), ParallelDims(1, 1, 1, 1), None)
        assert checkpointed.state_dict().keys() == model.state_dict().keys()
        batch = vlm_worker.global_batch(model.image_tokens)
        results = []
        for m in (model, checkpointed):
            loss, _ = vlm_objective(m, batch)
            loss.backward()
            results.append((loss, {n.replace("._checkpoint_wrapped_module", ""): p.grad
                                   for n, p in m.named_parameters()}))
        (loss, grads), (ac_loss, ac_grads) = results
        assert torch.equal(loss, ac_loss), fusion
        assert grads.keys() == ac_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(ac_grads[name], grad, rtol=0, atol=0, msg=f"{fusion} {name}")


def test_sequence_parallel_batches_pad_to_a_multiple_of_tp():
    """Padding after every row's text: the positions and targets of the rows are unchanged."""
    tok = train_char(["abcdefgh?"])
    batch = {"texts": ["a?", "abc?"], "answers": ["b", "cd"]}
    plain = PromptAnswerTokens(tok, 16, prompt="<image>{text}", image_tokens=3)(batch)
    padded = PromptAnswerTokens(tok, 16, prompt="<image>{text}", image_tokens=3, multiple=4)(batch)
    width = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-width // 4) * 4 > width
    for key in ("input_ids", "targets", "attention_mask", "image_mask"):
        assert torch.equal(padded[key][:, :width], plain[key]), key
    assert (padded["targets"][:, width:] == IGNORE).all() and not padded["image_mask"][:, width:].any()


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    """Caption and question/answer shards of 48 synthetic scenes, and a character tokenizer of their texts."""
    root = tmp_path_factory.mktemp("vlm")
    scenes = synth_scenes(root / "scenes", 48, size=16, seed=0)
    rows = [json.loads(line) for name in ("captions.jsonl", "vqa.jsonl") for line in (scenes / name).read_text().splitlines()]
    tokenizer = train_char([r.get("caption", "") + r.get("question", "") + r.get("answer", "") for r in rows] + ["\n"])
    caps = prepare_images(scenes / "images", scenes / "captions.jsonl", root / "caps", val_fraction=0.2, shard_samples=4)
    vqa = prepare_images(scenes / "images", scenes / "vqa.jsonl", root / "vqa", val_fraction=0.2, shard_samples=4)
    return caps.root, vqa.root, tokenizer.save(root / "tok")


def vlm_args(data, run_dir, *extra) -> list[str]:
    caps, _, tokenizer = data
    return [f"--data.path={json.dumps(str(caps))}", f"--data.tokenizer={json.dumps(str(tokenizer))}",
            f"--train.run_dir={json.dumps(str(run_dir))}", "--vision.image_size=8", "--vision.patch_size=4",
            "--vision.n_layers=1", "--vision.d_model=16", "--vision.n_heads=2", "--model.n_layers=2",
            "--model.d_model=16", "--model.n_heads=2", "--model.max_seq_len=64", "--train.seq_len=64",
            "--train.batch_size=4", "--train.steps=4", "--optim.warmup_steps=1", "--optim.lr=3e-3", "--log.every=1",
            "--eval.every=2", "--eval.batches=1", "--checkpoint.every=0", "--log.progress=false",
            "--log.tensorboard=false", "--train.device=cpu", *extra]


def make(data, run_dir, *extra):
    cfg = load_config(None, vlm_args(data, run_dir, *extra))
    return build_trainer(cfg, task=VLMTask(cfg))[1]


def logged(run_dir: Path, key: str) -> list:
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


def test_align_trains_the_projector_only_and_resumes_exactly(scene_data, tmp_path, one_thread):
    full = make(scene_data, tmp_path / "full")
    before = {k: v.clone() for k, v in full.engine.model.state_dict().items()}
    full.fit()
    after = full.engine.model.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]) != name.startswith("projector."), name
    assert_resume_replays(make, scene_data, tmp_path, after)
    assert logged(tmp_path / "full", "val_loss")[0][0] == 0  # the step-0 baseline


def assert_resume_replays(make, scene_data, tmp_path, after: dict) -> None:
    """A run stopped at step 2 and resumed from its checkpoint logs the losses of the uninterrupted
    run in tmp_path/full and ends with its weights `after`, bit for bit."""
    part = make(scene_data, tmp_path / "part")
    part.fit(stop_at=2)
    resumed = make(scene_data, tmp_path / "part", "--checkpoint.resume=auto")
    assert resumed.step == 2
    resumed.fit()
    assert logged(tmp_path / "part", "loss") == logged(tmp_path / "full", "loss")
    assert logged(tmp_path / "part", "val_loss") == logged(tmp_path / "full", "val_loss")
    for (name, a), b in zip(after.items(), resumed.engine.model.state_dict().values()):
        assert torch.equal(a, b), name


def launch(data, run_dir, *extra) -> None:
    """`tessera vlm` on 2 ranks under torchrun."""
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tessera",
           "vlm", str(config), *vlm_args(data, run_dir, "--checkpoint.every=2", *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow  # four two-rank launches of the trainer, DeepSpeed's start-up in two
def test_tessera_vlm_on_tp_and_zero3_trains_and_resumes(scene_data, tmp_path, one_thread):
    """TP=2 with sequence parallelism (batches padded to even lengths), cross-attention and every part
    trained reads what one process reads: the same losses, also resumed from its sharded checkpoint.
    ZeRO-3 resumes exactly, and its consolidated weights load as the VLM (the tied embedding once)."""
    trained = ["--vlm.fusion=cross_attention", "--vlm.cross_every=1", '--vlm.freeze=["none"]']
    one = make(scene_data, tmp_path / "one", *trained)
    one.fit()
    tp = ["--parallel.tp=2", "--parallel.dp_shard=1", *trained]
    launch(scene_data, tmp_path / "tp", *tp)
    launch(scene_data, tmp_path / "tp_resumed", *tp,
           f"--checkpoint.resume={json.dumps(str(tmp_path / 'tp' / 'checkpoints' / 'step_000002'))}")
    ref = dict(logged(tmp_path / "one", "loss"))
    for run, first in (("tp", 1), ("tp_resumed", 3)):
        got = dict(logged(tmp_path / run, "loss"))
        assert sorted(got) == list(range(first, 5)), run
        for step, loss in got.items():
            assert loss == pytest.approx(ref[step], rel=1e-5), (run, step)  # float32 sums in another order
    zero3 = ["--parallel.engine=deepspeed", "--parallel.zero_stage=3"]
    launch(scene_data, tmp_path / "zero3", *zero3)
    launch(scene_data, tmp_path / "zero3_resumed", *zero3,
           f"--checkpoint.resume={json.dumps(str(tmp_path / 'zero3' / 'checkpoints' / 'step_000002'))}")
    assert logged(tmp_path / "zero3_resumed", "loss") == logged(tmp_path / "zero3", "loss")[2:]
    final = [load_vlm(tmp_path / run / "checkpoints" / "step_000004")[0].state_dict()
             for run in ("zero3", "zero3_resumed")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert torch.equal(final[0]["lm.lm_head.weight"], final[0]["lm.tok_emb.weight"])


@pytest.mark.parametrize("extra,message", [
    (["--parallel.tp=2"], "parallel.tp=2 does not fit a world size of 1"),
    (["--lora.r=4"], "lora.r=4 puts adapters on the LM, which this run keeps frozen (vlm.stage='align'"),
    (["--lora.r=4", "--vlm.stage=instruct", "--vlm.freeze=[\"vision\", \"lm\"]"], "frozen: vision, lm); LoRA needs"),
    (["--lora.r=4", "--vlm.stage=instruct", "--lora.targets=[\"q_proj\"]"], "no linear layer named any of ['q_proj']"),
    (["--train.seq_len=6", "--model.max_seq_len=6"], "leaves no room for text"),
    (["--vlm.fusion=cross_attention", "--vlm.cross_every=3"], "vlm.cross_every=3 exceeds model.n_layers=2"),
    (["--vlm.fusion=film"], "vlm.fusion='film' is not valid"),
    (["--vlm.vision_from=/nonexistent"], "vlm.vision_from='/nonexistent'"),
])
def test_bad_settings_are_one_clear_line(scene_data, tmp_path, capsys, extra, message):
    config = tmp_path / "vlm.toml"
    config.write_text("")
    assert main(["vlm", str(config), *vlm_args(scene_data, tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
