#!/usr/bin/env bash
# Prefill speed of visual-token budgets on Qwen2.5-VL-7B, Qwen3-VL-8B and InternVL3-8B-shaped
# models built from configs (random weights, no download), float32 on the CPU. So that 2 CPU
# cores can run them, the language model is cut to LLM_LAYERS=4 decoder layers (28 / 36 / 28
# in the real models) and the vision tower to VISION_LAYERS=8 blocks (32 / 27 / 24; Qwen2.5-VL
# keeps its windowed attention with block 7 attending fully). Rows: unpatched, then
# visual_keep 0.25 and 0.11 of each image's tokens (score: attn on the class-token-free Qwen
# towers, cls_attn on InternViT). Each timed call is one greedy generate of one token, i.e. the
# prefill (vision tower, selection, LLM prefill): the time to the first token.
#
# Runs (each writes $OUT/bench_<model>_<image>px_b<batches>.{json,png}, OUT default
# docs/results):
#   qwen2.5-vl:7b     448 px (256 visual tokens)   batch 1 and 8 (ROUNDS=2, no warmup)
#   qwen2.5-vl:7b     896 px (1024 visual tokens)  batch 1
#   qwen3-vl:8b       448 px (196 visual tokens)   batch 1
#   internvl:internvl3-8b  448 px tile (256 visual tokens)  batch 1
# About 25 min on an idle 2-core machine (batch 8 at 448 px: about 80-120 s per call).
# Overrides: OUT, ROUNDS, LLM_LAYERS, VISION_LAYERS, RUNS (a subset of: q448 q896 q3 ivl).
set -euo pipefail
OUT=${OUT:-docs/results}
ROUNDS=${ROUNDS:-2}
LLM_LAYERS=${LLM_LAYERS:-4}
VISION_LAYERS=${VISION_LAYERS:-8}
RUNS=${RUNS:-q448 q896 q3 ivl}
mkdir -p "$OUT"
bench() {  # model image_px batches score
  local stem="$OUT/bench_${1//:/_}_${2}px_b${3//,/-}"
  python -m vlprune.cli bench --model "$1" --img-size "$2" -b "$3" --visual-keep 0.25,0.11 \
    --visual-score "$4" --llm-layers "$LLM_LAYERS" --vision-layers "$VISION_LAYERS" \
    --new-tokens 1 --rounds "$ROUNDS" --iters 1 --warmup 0 --no-memory --no-progress \
    --json "$stem.json" --plot "$stem.png"
}
for run in $RUNS; do
  case $run in
    q448) bench qwen2.5-vl:7b 448 1,8 attn ;;
    q896) bench qwen2.5-vl:7b 896 1 attn ;;
    q3) bench qwen3-vl:8b 448 1 attn ;;
    ivl) bench internvl:internvl3-8b 448 1 cls_attn ;;
    *) echo "unknown run $run (known: q448 q896 q3 ivl)" >&2; exit 2 ;;
  esac
done
