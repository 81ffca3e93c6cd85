#!/usr/bin/env bash
# Per-kernel device time of the GPU engine's decode forwards: `tokenlake bench engine` under
# Nsight Compute (ncu, one metric: gpu__time_duration.sum; caches and clocks left as they are),
# then bench/kernel_breakdown.py over its CSV. Kernels are launched one by one (no CUDA graphs)
# so that each is timed as a kernel of its own.
#
#   bench/kernel_breakdown.sh OUT_DIR MODEL BATCH CONTEXT [BUILD_DIR]
#   bench/kernel_breakdown.sh out llama3-8b 1 2048
#
# Profiled launches: SKIP (default 1500) are passed over first (the bandwidth and GEMM peaks and
# the prefill of the decode batch; raise it for large batches, whose prefill has more kernels),
# then COUNT (default 2000) are timed. Writes OUT_DIR/ncu_MODEL_bBATCH.csv.gz and
# OUT_DIR/kernels_MODEL_bBATCH.txt. Runs on any machine with an NVIDIA GPU, ncu and the
# project's CUDA build.
set -euo pipefail
OUT=${1:?usage: bench/kernel_breakdown.sh OUT_DIR MODEL BATCH CONTEXT [BUILD_DIR]}
MODEL=${2:?model}
BATCH=${3:?batch}
CONTEXT=${4:?context}
BUILD=${5:-build/cuda}
SKIP=${SKIP:-1500}
COUNT=${COUNT:-2000}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$BUILD/devlibs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
name=${MODEL}_b${BATCH}
"$NCU" --metrics gpu__time_duration.sum --cache-control none --clock-control none \
  --launch-skip "$SKIP" --launch-count "$COUNT" --csv --page raw \
  "$BUILD/bin/tokenlake" bench engine --model "$MODEL" --sections decode \
  --decode-batches "$BATCH" --decode-contexts "$CONTEXT" --decode-steps 4 --no-decode-graphs \
  --json "$OUT/bench_$name.json" > "$OUT/ncu_$name.csv" 2> "$OUT/ncu_$name.log"
gzip -f "$OUT/ncu_$name.csv"
python3 "$(dirname "$0")/kernel_breakdown.py" "$OUT/ncu_$name.csv.gz" | tee "$OUT/kernels_$name.txt"
