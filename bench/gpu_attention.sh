#!/usr/bin/env bash
# One GPU run: GPU tests, our kernel benchmark, PyTorch SDPA on the same shapes, the
# `tokenlake profile` JSON, and the comparison. Runs on any machine with an NVIDIA GPU and the
# project's CUDA build (cmake --preset cuda -B build/cuda), which may be built elsewhere and copied
# with its non-system libraries in build/cuda/devlibs (see bench/pack_devlibs.sh).
#
#   bash bench/gpu_attention.sh [OUT_DIR]     # OUT_DIR: default ./out; results and logs go there
#
# STEP_TIMEOUT (seconds, default 150), TEST_FILTER (a gtest filter) and SKIP_PROFILE=1 adjust it.
set -u -o pipefail
OUT=${1:-${OUT:-out}}
mkdir -p "$OUT"
B=build/cuda/bin
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
  --format=csv | tee "$OUT/device.txt"
T=${STEP_TIMEOUT:-150}
echo "== tests"
timeout "$T" $B/paged_attention_test ${TEST_FILTER:+--gtest_filter=$TEST_FILTER} \
  > "$OUT/test.log" 2>&1
echo "paged_attention_test rc=$?"
grep -E "FAILED|PASSED|SKIPPED|Failure|error|seed=" "$OUT/test.log" | sort | uniq -c | head -20
timeout 60 $B/device_arena_test > "$OUT/arena_test.log" 2>&1
echo "device_arena_test rc=$?"; tail -3 "$OUT/arena_test.log"
echo "== ours"
timeout "$T" $B/gpu_attention_bench "$OUT/tokenlake_bench.json" > "$OUT/bench.log" 2>&1
echo "gpu_attention_bench rc=$?"; cat "$OUT/bench.log"
echo "== ours, decode steps as CUDA graphs (merge costs; calls per layer in one graph, PDL)"
if [ -x $B/gpu_merge_bench ]; then
  timeout "$T" $B/gpu_merge_bench "$OUT/merge.json" > "$OUT/merge.log" 2>&1
  echo "gpu_merge_bench rc=$?"; cat "$OUT/merge.log"
fi
echo "== sdpa"
PYTHONUNBUFFERED=1 timeout "$T" python3 bench/sdpa_bench.py "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1
echo "sdpa rc=$?"; cat "$OUT/sdpa.log"
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  echo "== profile"
  # Same code as `tokenlake profile --json`, without the CLI's gRPC and HTTP libraries.
  timeout "$T" $B/gpu_attention_bench --profile-json "$OUT/gpu_profile.json" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"; tail -5 "$OUT/profile.log"
fi
echo "== report"
python3 bench/gpu_report.py "$OUT/tokenlake_bench.json" "$OUT/sdpa.json" \
  $( [ -f "$OUT/merge.json" ] && echo "$OUT/merge.json") | tee "$OUT/report.txt"
[ -f "$OUT/gpu_profile.json" ] && cat "$OUT/gpu_profile.json"
# The logs that matter stay as files; the secondary ones go into one archive.
(cd "$OUT" && tar czf logs.tgz device.txt arena_test.log sdpa.log \
  $( [ -f profile.log ] && echo profile.log) $( [ -f merge.log ] && echo merge.log merge.json) &&
  rm -f device.txt arena_test.log sdpa.log profile.log merge.log)
