#!/usr/bin/env bash
# The main job: install, then the Shakespeare recipe (configs/recipes/shakespeare/): prepare Tiny
# Shakespeare, train the character model on CPU, measure it before and after, print a sample and
# the summary (wall time, tokens/s). Extra arguments are config overrides, e.g.
# bash scripts/demo.sh --train.steps=500
overrides=("$@")
set --  # env.sh reads its own arguments as pip extras; the overrides are for the recipe
source "$(dirname "$0")/env.sh"
# Each demo is a fresh run; the first run of a recipe compiles, later ones find the compiled code
# in ~/.cache/tessera.
tessera recipe shakespeare ${overrides[@]+"${overrides[@]}"}
