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
tessera train configs/shakespeare_char.toml ${overrides[@]+"${overrides[@]}"}
tessera plot runs/shakespeare_char
echo "--- sample ---"
tessera generate --ckpt runs/shakespeare_char --prompt "ROMEO:" --max-new-tokens 500 --seed 1337
