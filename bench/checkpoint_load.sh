#!/usr/bin/env bash
# Loading a checkpoint onto the GPU, timed (issue 12, item 4: a 13.5 GB checkpoint from the page
# cache in under 5 s). Writes a random Llama-2-7B-shaped bf16 checkpoint (13.5 GB) as 3 shards
# with a model.safetensors.index.json into a temporary folder, reads it once into the page cache
# (cat > /dev/null), then times GpuLlamaModel::Load of it in a fresh process
# (checkpoint_load_timing load: 3 loads with the default upload options, then one per point of a
# sweep of threads x staging-buffer sizes, beside the pinned host-to-device bandwidth and one
# thread's memcpy rate from the mapped files measured in the same run).
#
#   bash bench/checkpoint_load.sh OUT_DIR [BUILD_DIR]     # BUILD_DIR: default build/cuda
#
# Runs on any machine with an NVIDIA GPU and the project's CUDA build (made there or elsewhere
# and copied with bench/pack_devlibs.sh); needs the target checkpoint_load_timing
# (cmake --build --preset cuda --target checkpoint_load_timing). Needs about 14 GB free in
# ${TMPDIR:-/tmp} and the memory to keep the checkpoint in the page cache; the folder is removed
# at the end. SHAPE=llama3-8b|tiny and DTYPE=f16|f32 pick another checkpoint (default
# llama2-7b, bf16). Writes OUT_DIR/checkpoint_load.json and OUT_DIR/checkpoint_load.log.
set -euo pipefail
OUT=${1:?usage: bench/checkpoint_load.sh OUT_DIR [BUILD_DIR]}
BUILD=${2:-build/cuda}
SHAPE=${SHAPE:-llama2-7b}
DTYPE=${DTYPE:-bf16}
mkdir -p "$OUT"
LOG="$OUT/checkpoint_load.log"
export LD_LIBRARY_PATH="$BUILD/devlibs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
TOKENLAKE_REVISION=${TOKENLAKE_REVISION:-$(cat "$BUILD/REVISION" 2>/dev/null ||
  git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TOKENLAKE_REVISION
CKPT=$(mktemp -d "${TMPDIR:-/tmp}/tokenlake_checkpoint.XXXXXX")
trap 'rm -rf "$CKPT"' EXIT

{
  echo "revision: $TOKENLAKE_REVISION"
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max \
    --format=csv 2>/dev/null || true
  nproc
  free -g | head -2
  df -h "$CKPT" | tail -1
} > "$LOG" 2>&1

"$BUILD/bin/checkpoint_load_timing" write "$CKPT" --shape "$SHAPE" --dtype "$DTYPE" --shards 3 \
  2>&1 | tee -a "$LOG"
ls -l "$CKPT" >> "$LOG"
start_ns=$(date +%s%N)
cat "$CKPT"/*.safetensors > /dev/null
echo "page cache warm-up (cat): $((($(date +%s%N) - start_ns) / 1000000)) ms" | tee -a "$LOG"
"$BUILD/bin/checkpoint_load_timing" load "$CKPT" "$OUT/checkpoint_load.json" 2>&1 | tee -a "$LOG"
