#!/usr/bin/env bash
# The main job: install, prepare Tiny Shakespeare, train the character model on CPU, print a sample.
# Extra arguments are config overrides, e.g. bash scripts/demo.sh --train.steps=500
overrides=("$@")
set --  # env.sh reads its own arguments as pip extras; the overrides are for `tessera train`
source "$(dirname "$0")/env.sh"
data=data/prepared/shakespeare_char
if [ ! -f "$data/manifest.json" ]; then
  tessera tokenizer train --kind char data/tinyshakespeare.txt --out "$data"
  tessera data prepare --input data/tinyshakespeare.txt --tokenizer "$data" --out "$data" --shard-tokens 100000
fi
start=$(date +%s.%N)
tessera train configs/shakespeare_char.toml --overwrite ${overrides[@]+"${overrides[@]}"}  # each demo is a fresh run
end=$(date +%s.%N)
tessera plot runs/shakespeare_char
echo "--- sample ---"
tessera generate --ckpt runs/shakespeare_char --prompt "ROMEO:" --max-new-tokens 500 --seed 1337
# The whole training command timed, start-up, evaluation, checkpoints and any compilation included
# (the first run of a recipe compiles; later ones find the compiled code in ~/.cache/tessera).
if [ -f runs/shakespeare_char/metrics.jsonl ]; then python - "$start" "$end" <<'PY'
import statistics, sys
from tessera.core.config import load_config
from tessera.core.metrics import read_metrics
t = load_config("runs/shakespeare_char/config.toml").train
rates = [r["tokens_per_s"] for r in read_metrics("runs/shakespeare_char") if "tokens_per_s" in r]
wall = float(sys.argv[2]) - float(sys.argv[1])
print(f"--- speed ({t.precision}, compile {str(t.compile).lower()}) ---\ntraining: {wall:.1f} s wall for {t.steps} steps "
      f"({t.steps * t.batch_size * t.seq_len / wall:,.0f} tokens/s over the whole command), "
      f"{statistics.median(rates):,.0f} tokens/s while training (median)")
PY
fi
