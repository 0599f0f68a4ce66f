#!/usr/bin/env bash
# The scenes VLM recipe (issue 14), end to end on a CPU:
#   synth-scenes (train + held-out) -> tokenizer -> LM text pretraining -> CLIP vision tower
#   -> prepare-images (captions, VQA) -> vlm stage 1 "align" (projector only, on captions)
#   -> vlm stage 2 "instruct" (every part, on question/answer pairs and "describe the image." ->
#      caption pairs, loss on answers) -> eval captions (after each stage) and vqa on the
#      held-out scenes -> a summary.
# Usage: scripts/recipe_scenes_vlm.sh [OUT_DIR]   (env: N_TRAIN, N_HELD_OUT, *_STEPS, PYTHON)
set -euo pipefail
OUT=${1:-runs/scenes_vlm}
N_TRAIN=${N_TRAIN:-3000}
N_HELD_OUT=${N_HELD_OUT:-200}
LM_STEPS=${LM_STEPS:-300}
CLIP_STEPS=${CLIP_STEPS:-300}
ALIGN_STEPS=${ALIGN_STEPS:-400}
INSTRUCT_STEPS=${INSTRUCT_STEPS:-600}
PYTHON=${PYTHON:-python}
CONFIGS=$(cd "$(dirname "$0")/../configs/scenes_vlm" && pwd)
T="$PYTHON -m tessera"
mkdir -p "$OUT"
start=$(date +%s)

$T data synth-scenes --out "$OUT/scenes" --n "$N_TRAIN" --size 32 --seed 0
$T data synth-scenes --out "$OUT/held_out" --n "$N_HELD_OUT" --size 32 --seed 1
# the texts the LM learns: every caption, every question followed by its answer
$PYTHON - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/scenes/captions.jsonl")]
qa = [json.loads(l) for l in open(f"{out}/scenes/vqa.jsonl")]
with open(f"{out}/texts.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps({"text": r["caption"]}) + "\n")
    for r in qa:
        f.write(json.dumps({"text": r["question"] + "\n" + r["answer"]}) + "\n")
with open(f"{out}/instruct.jsonl", "w") as f:  # questions, and the caption asked for as an instruction
    for r in qa:
        f.write(json.dumps(r) + "\n")
    for r in rows:
        f.write(json.dumps({"image": r["image"], "question": "describe the image.", "answer": r["caption"]}) + "\n")
PY
$T tokenizer train "$OUT/texts.jsonl" --kind bpe --vocab-size 320 --out "$OUT/tok"
$T data prepare --input "$OUT/texts.jsonl" --tokenizer "$OUT/tok" --out "$OUT/text_shards"
$T data prepare-images --images "$OUT/scenes/images" --captions "$OUT/scenes/captions.jsonl" --out "$OUT/captions"
$T data prepare-images --images "$OUT/scenes/images" --captions "$OUT/instruct.jsonl" --out "$OUT/instruct_data"

$T train "$CONFIGS/lm.toml" --overwrite --data.path="\"$OUT/text_shards\"" --train.run_dir="\"$OUT/lm\"" \
    --train.steps=$LM_STEPS --log.progress=false
$T clip "$CONFIGS/clip.toml" --overwrite --data.path="\"$OUT/scenes\"" --data.tokenizer="\"$OUT/tok/tokenizer.json\"" \
    --train.run_dir="\"$OUT/clip\"" --train.steps=$CLIP_STEPS --log.progress=false
$T vlm "$CONFIGS/vlm.toml" --overwrite --vlm.stage='"align"' --data.path="\"$OUT/captions\"" \
    --data.tokenizer="\"$OUT/tok/tokenizer.json\"" --model.init_from="\"$OUT/lm\""  \
    --vlm.vision_from="\"$OUT/clip\"" --train.run_dir="\"$OUT/align\"" --train.steps=$ALIGN_STEPS --log.progress=false
$T vlm "$CONFIGS/vlm.toml" --overwrite --vlm.stage='"instruct"' --data.path="\"$OUT/instruct_data\"" \
    --data.tokenizer="\"$OUT/tok/tokenizer.json\"" --vlm.init_from="\"$OUT/align\"" --vlm.freeze='["none"]' \
    --vlm.caption_prompt='"<image>\ndescribe the image."' \
    --train.run_dir="\"$OUT/instruct\"" --train.steps=$INSTRUCT_STEPS --optim.lr=1e-3 --log.progress=false
train_s=$(( $(date +%s) - start ))

$T eval captions --ckpt "$OUT/align" --data "$OUT/held_out" --device cpu | tee "$OUT/eval_captions_align.json"
$T eval captions --ckpt "$OUT/instruct" --data "$OUT/held_out" --device cpu | tee "$OUT/eval_captions.json"
$T eval vqa --ckpt "$OUT/instruct" --data "$OUT/held_out" --device cpu | tee "$OUT/eval_vqa.json"
$PYTHON - "$OUT" "$train_s" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
a, c = json.load(open(f"{out}/eval_captions_align.json")), json.load(open(f"{out}/eval_captions.json"))
v = json.load(open(f"{out}/eval_vqa.json"))
print(f"scenes VLM recipe ({seconds} s of data + training on this machine), held-out scenes:")
for stage, m in (("align", a), ("instruct", c)):
    print(f"  captions ({m['images']} images, after stage {stage}): exact match {m['exact_match']:.1%}, "
          f"CIDEr-D {m['cider_d']:.3f}, BLEU {m['bleu']:.1f}, ROUGE-L {m['rougeL']:.3f}")
print(f"  VQA ({v['questions']} questions, stage instruct): accuracy {v['accuracy']:.1%}")
for kind, acc in v["by_question"].items():
    print(f"    {kind}: {acc:.1%}")
PY
