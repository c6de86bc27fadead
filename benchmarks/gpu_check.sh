#!/usr/bin/env bash
# GPU check: the CUDA tests and the GPU speed tables on one machine with a GPU. Expected about
# 5 minutes on one H100; every step has a time limit, 470 s in all, so it ends within 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# Needs CUDA and the package installed with its extras and pytest (pip install -e ".[all,dev]");
# it runs the python on PATH (or $PYTHON). Steps, in order, each printing when it starts, then
# its status and duration, then its summary line(s):
#   1. pytest -m gpu: every test marked gpu (tests/test_gpu.py: float16 / bfloat16 of every
#      family against float32, the SDPA math and efficient kernels with the size bias,
#      torch.compile(mode="reduce-overhead"), the 7B LLaVA built on the GPU; and the other
#      gpu-marked tests)
#   2. vlprune bench vit_base_patch16_224, batch 256, float16: unpatched, merge_r 0 / 8 / 16,
#      prune_keep 0.7 (cls_attn)
#   3. the same on vit_large_patch16_224
#   4. the same on the open_clip ViT-L-14-336 image tower (336 px, 577 tokens)
#   5. LLaVA-1.5-7B prefill (random weights, all 32 language-model layers, bfloat16, built on
#      the GPU), batch 1 and 8: 576 visual tokens against 192 / 128 / 64 (cls_attn) and FastV
#      (llm_layer=2 llm_keep=64)
# A failed or timed-out step does not stop the others; the exit status is then 1. Without CUDA
# (and without --dry-run) it stops at once, exit status 2.
#
# Writes to DIR (default results/gpu_check_<date>_<time>): env.json (versions, GPU),
# nvidia-smi.txt, pytest_gpu.log and pytest_gpu.xml (JUnit), bench_<table>.json (vlprune bench
# --json: every row and timing) and bench_<table>.log for the tables vit_base, vit_large,
# open_clip_l14_336 and llava_7b, and summary.txt: one line per table (and per batch size),
# e.g. "vit_base vit_base_patch16_224 b256 float16 on cuda (... img/s unpatched): r=16 1.90x
# speedup, efficiency 0.97; ...", each step's status and duration, and the total time.
#
# --dry-run runs every step on the CPU at tiny sizes in about a minute and a half on 2 cores:
# the same pytest command (the gpu tests are collected and skip without CUDA) and the same
# bench, JSON and summary code on test_vit, vit_tiny at 64 px and open_clip ViT-S-32 at 64 px
# (float32, batch 2) and llava:tiny (bfloat16, batch 1 and 2; FastV at its layer 1), one round
# each. tests/test_gpu_check.py runs it. Time limits: T_PYTEST, T_VIT_BASE, T_VIT_LARGE,
# T_OPEN_CLIP, T_LLAVA (seconds).
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]" >&2; exit 2; }
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || usage; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; usage ;;
  esac
  shift
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
cd "$ROOT"
PYTHON=${PYTHON:-python}
HELPER=("$PYTHON" "$HERE/gpu_check.py")
OUT=${OUT:-results/gpu_check_$(date +%Y%m%d_%H%M%S)}
T_START=$(date +%s)

if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch', 'vlprune', 'pytest')))" 2>/dev/null; then
  echo "gpu_check: error: '$PYTHON' cannot import torch, vlprune and pytest; install the package" \
    "(pip install -e '.[all,dev]') or set PYTHON" >&2
  exit 2
fi
if [ "$DRY" = 0 ]; then
  "${HELPER[@]}" require-cuda || exit 2
fi
mkdir -p "$OUT"
: > "$OUT/summary.txt"
echo "gpu_check: writing to $OUT$([ "$DRY" = 1 ] && echo ' (dry run: CPU, tiny sizes)')"
"${HELPER[@]}" env "$OUT/env.json"
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi

# the tables: real run / dry run
if [ "$DRY" = 0 ]; then
  DEV=(--device cuda)
  IMG_RUN=(-b 256 --dtype float16 --rounds 5 --iters 2 --warmup 1)
  LLAVA_RUN=(--model llava:1.5-7b --llm-layers 32 --dtype bfloat16 -b 1,8 --rounds 5 --iters 1 --warmup 1
             --setting "llm_layer=2 llm_keep=64")
  VIT_BASE=(--model vit_base_patch16_224)
  VIT_LARGE=(--model vit_large_patch16_224)
  OPEN_CLIP=(--model open_clip:ViT-L-14-336)
  # time limits (s), 470 in all; expected on one H100: about 150, 15, 20, 35, 40
  T_PYTEST=${T_PYTEST:-200} T_VIT_BASE=${T_VIT_BASE:-45} T_VIT_LARGE=${T_VIT_LARGE:-55}
  T_OPEN_CLIP=${T_OPEN_CLIP:-70} T_LLAVA=${T_LLAVA:-100}
else
  DEV=(--device cpu)
  IMG_RUN=(-b 2 --dtype float32 --rounds 1 --iters 1 --warmup 0 --no-memory)
  LLAVA_RUN=(--model llava:tiny --dtype bfloat16 -b 1,2 --rounds 1 --iters 1 --warmup 0 --no-memory
             --setting "llm_layer=1 llm_keep=64")  # llava:tiny has 2 language-model layers
  VIT_BASE=(--model test_vit)
  VIT_LARGE=(--model vit_tiny_patch16_224 --img-size 64)
  OPEN_CLIP=(--model open_clip:ViT-S-32 --img-size 64)
  T_PYTEST=${T_PYTEST:-180} T_VIT_BASE=${T_VIT_BASE:-90} T_VIT_LARGE=${T_VIT_LARGE:-90}
  T_OPEN_CLIP=${T_OPEN_CLIP:-90} T_LLAVA=${T_LLAVA:-90}
fi
IMG_ROWS=(--merge-r 0,8,16 --prune-keep 0.7)
LLAVA_ROWS=(--visual-keep 192,128,64 --visual-score cls_attn --text-tokens 40 --new-tokens 1)

STEPS=5
N=0
FAILED=0
STATUS=()

# step TITLE LIMIT_S LOG CMD...: run CMD with a time limit, its output into LOG; print and
# record its start, duration and status (a failure does not stop the script)
step() {
  local title=$1 limit=$2 log=$3; shift 3
  N=$((N + 1))
  local t0 rc=0
  t0=$(date +%s)
  echo
  echo "== [$N/$STEPS] $title (started $(date +%T), limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t0 )) state=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    state="TIMED OUT after ${limit} s"
  elif [ "$rc" != 0 ]; then
    state="FAILED (exit $rc)"
  fi
  [ "$state" = ok ] || FAILED=1
  STATUS+=("[$N/$STEPS] $title: $state in ${dt} s (log: $log)")
  echo "== [$N/$STEPS] $title: $state in ${dt} s"
  return 0
}

# summarize ARGS...: the helper's summary line(s), on the console and in summary.txt; a missing
# or broken output file counts as a failed step
summarize() {
  local lines rc=0
  lines=$("${HELPER[@]}" "$@") || rc=$?
  echo "$lines" | sed 's/^/summary: /' | tee -a "$OUT/summary.txt"
  if [ "$rc" != 0 ]; then FAILED=1; fi
  return 0
}

# bench TABLE LIMIT ARGS...: one vlprune bench table, its JSON and its log under OUT
bench() {
  local table=$1 limit=$2; shift 2
  local json="$OUT/bench_$table.json" log="$OUT/bench_$table.log"
  rm -f "$json"
  step "bench $table" "$limit" "$log" \
    "$PYTHON" -m vlprune.cli bench "$@" "${DEV[@]}" --no-progress --json "$json"
  # the table (without the --result line, Python warnings and the source lines they quote)
  sed -n '1,/^--result/p' "$log" | grep -v '^--result' \
    | awk '/Warning: /{skip=1; next} skip && /^  [^ 0-9]/{skip=0; next} {skip=0; print}' || true
  summarize bench-summary "$table" "$json"
}

rm -f "$OUT/pytest_gpu.xml"
step "pytest -m gpu" "$T_PYTEST" "$OUT/pytest_gpu.log" \
  "$PYTHON" -m pytest -m gpu -v -rfEs -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml" tests/
tail -n 3 "$OUT/pytest_gpu.log"
summarize pytest-summary "$OUT/pytest_gpu.xml"

bench vit_base "$T_VIT_BASE" "${VIT_BASE[@]}" "${IMG_RUN[@]}" "${IMG_ROWS[@]}"
bench vit_large "$T_VIT_LARGE" "${VIT_LARGE[@]}" "${IMG_RUN[@]}" "${IMG_ROWS[@]}"
bench open_clip_l14_336 "$T_OPEN_CLIP" "${OPEN_CLIP[@]}" "${IMG_RUN[@]}" "${IMG_ROWS[@]}"
bench llava_7b "$T_LLAVA" "${LLAVA_RUN[@]}" "${LLAVA_ROWS[@]}"

TOTAL=$(( $(date +%s) - T_START ))
echo
{
  printf '%s\n' "${STATUS[@]}"
  echo "total: ${TOTAL} s ($((TOTAL / 60)) min $((TOTAL % 60)) s)$([ "$DRY" = 1 ] && echo ', dry run')"
} | tee -a "$OUT/summary.txt"
if [ "$FAILED" != 0 ]; then
  echo "gpu_check: FAILED (see the logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps ok; results in $OUT"
