"""Scenes VLM: a small captioning + VQA model of synthetic scenes (`tessera data synth-scenes`), on
the stages that exist: an LM pretrained on the captions and question/answer texts (`lm.toml`), a
vision tower from CLIP on the captions with synth-scenes' hard negatives (`clip.toml`), then `tessera
vlm` stage "align" (the projector alone, on captions) and stage "instruct" (the projector and the LM,
the CLIP tower frozen, on the questions and "describe the image." -> caption, the loss on answers),
all from `train.toml`; bf16 autocast where the CPU computes it natively. Reported on held-out scenes (another
seed): caption exact match, CIDEr-D, METEOR, BLEU and ROUGE-L after each VLM stage (and of the VLM
before any stage trains it), VQA accuracy per kind of question, the CLIP tower's image<->text Recall@K,
and a chat with the instruct model through `tessera serve`'s OpenAI API (held-out questions with the
image inline). Stage instruct trains on the transcript the server renders a chat turn as, so the served
model sees the format it learnt. The run directory holds the instruct model, ready for `tessera serve`
and `tessera generate --image`."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tessera.recipes.runner import RecipeContext

SIZES = {"train": (12000, 48), "held_out": (200, 12)}  # scenes (full, smoke)
IMAGE_SIZE = 32
STEPS = {"lm": (80, 2), "clip": (1450, 2), "align": (100, 2), "instruct": (3000, 3)}
SMOKE = ["--model.n_layers=2", "--model.d_model=32", "--vision.n_layers=1", "--vision.d_model=32",
         "--train.batch_size=4", "--eval.every=0", "--checkpoint.every=0", "--log.every=1",
         "--optim.warmup_steps=1"]
CHAT_PROMPT = "user: <image>{text}\nassistant:"  # how `tessera serve` renders a user turn of an image and a text
CAPTION_PROMPT = CHAT_PROMPT.format(text="describe the image.")
CHAT_QUESTIONS = (40, 4)  # held-out questions asked through the server (full, smoke)


def prepare(ctx: RecipeContext) -> None:
    """Under data.path: scenes `train/` and `held_out/`, `texts.jsonl` (every caption, every question
    and its answer) as LM shards `text/` with a BPE tokenizer, and image shards `captions/` (stage
    align) and `instruct/` (the questions plus the caption asked for as an instruction)."""
    from tessera.core.data import prepare as prepare_shards
    from tessera.core.tokenizer import train_bpe
    from tessera.multimodal.image_shards import prepare_images
    from tessera.multimodal.scenes import synth_scenes

    root = ctx.data_dir
    seed = ctx.cfg.train.seed
    train = synth_scenes(root / "train", ctx.pick(*SIZES["train"]), IMAGE_SIZE, seed)
    synth_scenes(root / "held_out", ctx.pick(*SIZES["held_out"]), IMAGE_SIZE, seed + 1)
    captions = [json.loads(line) for line in (train / "captions.jsonl").read_text().splitlines()]
    vqa = [json.loads(line) for line in (train / "vqa.jsonl").read_text().splitlines()]
    texts = [r["caption"] for r in captions] + [f"{r['question']}\n{r['answer']}" for r in vqa]
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    instruct = vqa + [{"image": r["image"], "question": "describe the image.", "answer": r["caption"]} for r in captions]
    (root / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instruct))
    tok = train_bpe(iter(texts), 320)
    prepare_shards([str(root / "texts.jsonl")], tok, root / "text", val_fraction=ctx.pick(0.05, 0.0))
    prepare_images(train / "images", train / "captions.jsonl", root / "captions", val_fraction=ctx.pick(0.05, 0.0))
    prepare_images(train / "images", root / "instruct.jsonl", root / "instruct", val_fraction=ctx.pick(0.02, 0.0))


def caption_metrics(scores: dict) -> dict[str, float]:
    return {"caption exact match": scores["exact_match"], "caption CIDEr-D": scores["cider_d"],
            "caption METEOR": scores["meteor"], "caption BLEU": scores["bleu"], "caption ROUGE-L": scores["rougeL"]}


def held_out_scores(ckpt, held_out, vqa: bool = False) -> tuple[dict, dict | None]:
    """`tessera eval captions` (and, with `vqa`, `tessera eval vqa`) of a VLM checkpoint on the
    held-out scenes, greedy, from one load of the model."""
    from tessera.core.tokenizer import load_tokenizer
    from tessera.multimodal.vlm_eval import caption_scores, vqa_scores
    from tessera.multimodal.vlm_inference import load_vlm

    model, cfg = load_vlm(ckpt, "cpu")
    tokenizer = load_tokenizer(ckpt)
    captions = caption_scores(model, cfg, tokenizer, held_out, batch_size=50)
    return captions, vqa_scores(model, cfg, tokenizer, held_out, batch_size=50) if vqa else None


def chat(ckpt, held_out, questions: int) -> list[tuple[str, str, str]]:
    """The first `questions` held-out questions asked through `tessera serve`'s chat API (the app on a
    loopback port, an OpenAI chat message with the scene inline as a PNG data URL, temperature 0):
    (question, the served answer, the right answer)."""
    import base64

    import httpx

    from tessera.cli.interop import vision_model_for_serving
    from tessera.interop.serve import create_app, serving

    rows = [json.loads(line) for line in (held_out / "vqa.jsonl").read_text().splitlines()][:questions]
    model, tokenizer, name, embedder = vision_model_for_serving(str(ckpt), "cpu")
    exchanges = []
    with serving(create_app(model, tokenizer, model_name=name, embedder=embedder)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        for row in rows:
            image = base64.b64encode((held_out / "images" / row["image"]).read_bytes()).decode()
            content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                       {"type": "text", "text": row["question"]}]
            reply = client.post("/chat/completions", json={"model": name, "temperature": 0, "max_tokens": 8,
                                                           "messages": [{"role": "user", "content": content}]})
            reply.raise_for_status()
            exchanges.append((row["question"], reply.json()["choices"][0]["message"]["content"], row["answer"]))
    return exchanges


def run(ctx: RecipeContext) -> dict:
    """prepare -> LM -> CLIP -> align -> instruct -> held-out captions (after each VLM stage and of
    the untrained projector), VQA and retrieval -> summary."""
    from tessera.multimodal.clip_eval import retrieval_scores
    from tessera.multimodal.vlm_eval import normalise
    from tessera.recipes.runner import write_summary
    from tessera.recipes.stages import train_stage

    root, out = ctx.data_dir, ctx.out
    with ctx.timer("prepare"):
        prepare(ctx)
    tokenizer = f'--data.tokenizer="{root / "text" / "tokenizer.json"}"'
    steps = {k: f"--train.steps={ctx.pick(*v)}" for k, v in STEPS.items()}
    lm = train_stage(ctx, "LM", out / "lm", [f'--data.path="{root / "text"}"', steps["lm"]], config="lm.toml")
    clip = train_stage(ctx, "CLIP", out / "clip", [f'--data.path="{root / "train"}"', tokenizer, steps["clip"]],
                       "clip", config="clip.toml")
    align_args = ['--vlm.stage="align"', f'--data.path="{root / "captions"}"', tokenizer,
                  f'--model.init_from="{lm}"', f'--vlm.vision_from="{clip}"']
    untrained = train_stage(ctx, "VLM as initialised", out / "untrained",  # one step at lr 0: nothing moves
                            [*align_args, "--train.steps=1", "--optim.lr=0", "--optim.min_lr=0"], "vlm")
    align = train_stage(ctx, "align", out / "align", [*align_args, steps["align"]], "vlm")
    instruct = train_stage(ctx, "instruct", out, ['--vlm.stage="instruct"', f'--data.path="{root / "instruct"}"',
                                                  tokenizer, f'--vlm.init_from="{align}"',
                                                  f"--vlm.prompt={json.dumps(CHAT_PROMPT)}",
                                                  f"--vlm.caption_prompt={json.dumps(CAPTION_PROMPT)}", steps["instruct"],
                                                  "--optim.lr=1e-3", f"--train.compile={ctx.pick('true', 'false')}"],
                           "vlm")
    held_out = root / "held_out"
    with ctx.timer("evaluate"):
        before = caption_metrics(held_out_scores(untrained, held_out)[0])
        after_align = caption_metrics(held_out_scores(align, held_out)[0])
        captions, vqa = held_out_scores(instruct, held_out, vqa=True)
        after = {**caption_metrics(captions), **{f"{k} (after align)": v for k, v in after_align.items()},
                 "VQA accuracy": vqa["accuracy"], **{f"VQA {k}": v for k, v in vqa["by_question"].items()},
                 **{f"CLIP {k}": v for k, v in retrieval_scores(clip, held_out).items() if k != "pairs"}}
    with ctx.timer("chat through tessera serve"):
        exchanges = chat(instruct, held_out, ctx.pick(*CHAT_QUESTIONS))
    after["chat accuracy (served)"] = sum(normalise(p) == normalise(a) for _, p, a in exchanges) / len(exchanges)
    samples = {f"{CAPTION_PROMPT} [{name}]": text for name, text in captions["examples"]}
    samples.update({f"{CHAT_PROMPT.format(text=q)} [held out]": f"{p!r} (right: {a!r})" for q, p, a in vqa["examples"]})
    samples.update({f"chat: {q} [held out, served]": f"{p!r} (right: {a!r})" for q, p, a in exchanges[:3]})
    return write_summary(ctx, before, after, samples, instruct)
