#!/usr/bin/env bash
# Speed of every CLIP-family tower at ViT-B-16 shapes, batch 32, random weights (no download):
# open_clip, Hugging Face CLIP and SigLIP, image and text towers. Writes one JSON and one plot
# per tower to OUT (default docs/results), named bench_<tower>${SUFFIX}.json. Run on an
# otherwise idle machine. CPU timings are steadier with glibc's allocator told to keep memory
# (no page faults on every forward): set MALLOC=tuned for that, with SUFFIX=_malloc_tuned.
set -euo pipefail
OUT=${OUT:-docs/results}
BS=${BS:-32}
COMMON=(--batch-size "$BS" --rounds "${ROUNDS:-3}" --iters 1 --no-progress)
SUFFIX=${SUFFIX:-}
if [ "${MALLOC:-}" = tuned ]; then
  export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824
fi
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one bench, its JSON and plot under OUT
  local name=$1; shift
  echo "== $name"
  vlprune bench "${COMMON[@]}" "$@" --json "$OUT/bench_$name$SUFFIX.json" --plot "$OUT/bench_$name$SUFFIX.png" \
    | sed -n '1,/^--result/p' | grep -v '^--result'
}
run open_clip_vit_b16_image --model open_clip:ViT-B-16 --merge-r 0,8,16 --prune-keep 0.7
run hf_clip_vit_b16_image --model hf_clip:ViT-B-16 --merge-r 0,8,16 --prune-keep 0.7
run hf_siglip_b16_image --model hf_siglip:base-patch16-224 --merge-r 0,8,16 \
  --setting "prune_keep=0.7 prune_score=key_norm"
run open_clip_vit_b16_text --model open_clip:ViT-B-16 --tower text --merge-r 0,2,4 --prune-keep 0.7
run hf_clip_vit_b16_text --model hf_clip:ViT-B-16 --tower text --merge-r 0,2,4 --prune-keep 0.7
run hf_siglip_b16_text --model hf_siglip:base-patch16-224 --tower text --merge-r 0,2,4 --prune-keep 0.7
