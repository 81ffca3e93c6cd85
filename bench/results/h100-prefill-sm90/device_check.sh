#!/usr/bin/env bash
# One device call for the sm90 prefill kernel: GPU tests (filter $1), SASS check, the prefill
# benchmarks (TL_BENCH_ONLY=prefill), optional compute-sanitizer ($2 = memcheck filter) and ncu
# ($3 = 1). Binaries from build/e-cuda (cmake --preset cuda -B build/e-cuda
# -DTOKENLAKE_BUILD_BENCHMARKS=OFF) with their libraries in build/e-cuda/devlibs.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
B=build/e-cuda/bin
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/e-cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
cuobjdump -sass -fun PrefillSm90Kernel $B/paged_attention_test 2>/dev/null > "$OUT/sass.txt" ||
  cuobjdump -sass $B/paged_attention_test > "$OUT/sass_all.txt"
echo "HGMMA in sass: $(grep -c HGMMA "$OUT"/sass*.txt)"
echo "== tests ($1)"
timeout 150 $B/paged_attention_test --gtest_filter="$1" > "$OUT/test.log" 2>&1
echo "paged_attention_test rc=$?"
grep -E "^\[  (FAILED|PASSED|  OK) |Failure|relative|Which is|q=|error" "$OUT/test.log" | head -40
echo "== bench"
TL_BENCH_ONLY=prefill timeout 120 $B/gpu_attention_bench "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "gpu_attention_bench rc=$?"; cat "$OUT/bench.log"
if [ -n "${2:-}" ]; then
  echo "== memcheck ($2)"
  timeout 150 compute-sanitizer --tool memcheck $B/paged_attention_test --gtest_filter="$2" \
    > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -4 "$OUT/memcheck.log"
  timeout 150 compute-sanitizer --tool racecheck $B/paged_attention_test --gtest_filter="$2" \
    > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -4 "$OUT/racecheck.log"
fi
if [ "${3:-0}" = 1 ]; then
  echo "== ncu"
  TL_BENCH_ONLY=prefill_cached_sm90 timeout 150 ncu --kernel-name regex:PrefillSm90 \
    --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section MemoryWorkloadAnalysis \
    $B/gpu_attention_bench /tmp/ncu.json > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"; grep -E "Duration|Throughput|Busy|Pipe|Stall|Warp Cycles|Issued|Registers|Achieved|L2 Hit|Eligible" "$OUT/ncu.txt" | head -40
fi
