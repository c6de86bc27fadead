#!/usr/bin/env bash
# Prefill and decode speed of visual-token budgets on a LLaVA-1.5-7B-shaped model built from a
# config (random weights, no download): CLIP ViT-L/14-336 (576 visual tokens), projector and
# Llama-2-7B widths, with the language model cut to LLM_LAYERS=4 decoder layers (32 in the
# real model) so that a CPU can run it. Rows: unpatched; visual_keep 192 / 128 / 64 with
# cls_attn (before the LLM); FastV llm_layer=2 llm_keep=64 (inside the LLM). Each timed call
# is one generate of NEW_TOKENS=8 tokens: its prefill (time to the first token) and its
# NEW_TOKENS - 1 decode steps are timed apart. One run per batch size in BATCHES (default
# "8 1"), each writing $OUT/bench_<model>_b<batch>$SUFFIX.{json,png} (OUT default
# docs/results; e.g. bench_llava_1.5-7b_b8.json). Run on an otherwise idle machine; set
# MALLOC=tuned (with SUFFIX=_malloc_tuned) for glibc's allocator told to keep memory.
#
# Expected runtime on 2 CPU cores, float32, with the defaults:
#   batch 8: prefill per call about 150 s unpatched, 83 s / 71 s / 60 s at 192 / 128 / 64
#     visual tokens, 105 s FastV (time follows the prefill FLOPs: 1428, 786, 680, 577, 1002
#     GFLOPs per image); decoding 7 steps adds about 3 s per call. One round of the five rows
#     takes about 8 min; ROUNDS=2 with no warmup round, plus the batch-1 FLOPs pass (about
#     1 min) and building the model (under 1 min): about 18 min.
#   batch 1: about 1/7 of that per round; WARMUP=1 + ROUNDS=5: about 10 min.
# ROUNDS / WARMUP apply to every batch size when set (default: 2 / 0 for batch >= 4, 5 / 1
# below). Other overrides: NEW_TOKENS, BATCHES, MODEL (e.g. llava:tiny to try the script),
# LLM_LAYERS, TEXT_TOKENS, OUT, SUFFIX.
set -euo pipefail
OUT=${OUT:-docs/results}
MODEL=${MODEL:-llava:1.5-7b}
LLM_LAYERS=${LLM_LAYERS:-4}
NEW_TOKENS=${NEW_TOKENS:-8}
TEXT_TOKENS=${TEXT_TOKENS:-40}
BATCHES=${BATCHES:-8 1}
SUFFIX=${SUFFIX:-}
if [ "${MALLOC:-}" = tuned ]; then
  export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824
fi
mkdir -p "$OUT"
name=${MODEL//:/_}
for bs in $BATCHES; do
  if [ "$bs" -ge 4 ]; then rounds=2 warmup=0; else rounds=5 warmup=1; fi
  rounds=${ROUNDS:-$rounds}
  warmup=${WARMUP:-$warmup}
  stem="$OUT/bench_${name}_b$bs$SUFFIX"
  echo "== $MODEL --llm-layers $LLM_LAYERS batch $bs: $rounds rounds, $warmup warmup, $NEW_TOKENS new tokens ($(date +%T))"
  vlprune bench --model "$MODEL" --llm-layers "$LLM_LAYERS" --batch-size "$bs" \
    --text-tokens "$TEXT_TOKENS" --new-tokens "$NEW_TOKENS" \
    --rounds "$rounds" --iters 1 --warmup "$warmup" --no-memory --no-progress \
    --visual-keep 192,128,64 --visual-score cls_attn --setting "llm_layer=2 llm_keep=64" \
    --json "$stem.json" --plot "$stem.png" \
    | sed -n '1,/^--result/p' | grep -v '^--result'
done
echo "== done ($(date +%T))"
