#!/usr/bin/env bash
# One device call for the tensor-core decode kernel (decode3: descriptor modes 3 and 4): the GPU
# tests, the decode benchmark rows (TL_BENCH_ONLY=decode: both kernels, single call and 10 back
# to back, beside the copy and the read-only stream), PyTorch SDPA on the same shapes (SDPA=0:
# skipped), compute-sanitizer memcheck and racecheck on the tests given, and ncu of one
# tensor-core decode launch. Binaries from build/f2-cuda (cmake --preset cuda -B build/f2-cuda
# -DTOKENLAKE_BUILD_BENCHMARKS=OFF; bash bench/pack_devlibs.sh build/f2-cuda). Results go to $OUT.
#   [REPEAT=N] [SDPA=0] bash bench/results/h100-decode3/device_run.sh [SANITIZER_FILTER] [NCU=1]
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
B=build/f2-cuda/bin
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/f2-cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
  --format=csv | tee "$OUT/device.txt"
echo "== tests"
timeout 100 $B/paged_attention_test > "$OUT/test.log" 2>&1
echo "paged_attention_test rc=$?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|relative|Which is|error" "$OUT/test.log" | head -30
echo "== bench (decode rows)"
TL_BENCH_ONLY=decode timeout 150 $B/gpu_attention_bench "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "gpu_attention_bench rc=$?"; cat "$OUT/bench.log"
# REPEAT=N: the decode rows N - 1 more times (the spread between runs of one session).
for i in $(seq 2 "${REPEAT:-1}"); do
  TL_BENCH_ONLY=decode timeout 150 $B/gpu_attention_bench "$OUT/bench$i.json" > "$OUT/bench$i.log" 2>&1
  echo "gpu_attention_bench ($i) rc=$?"; grep -E "^(decode|decode_cc|decode_tc_[a-z0-9_]+) " "$OUT/bench$i.log"
done
if [ "${SDPA:-1}" = 1 ]; then
  echo "== sdpa"
  PYTHONUNBUFFERED=1 timeout 60 python3 bench/sdpa_bench.py "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1
  echo "sdpa rc=$?"; grep -E "copy|q=1 " "$OUT/sdpa.log"
fi
if [ -n "${1:-}" ]; then
  echo "== memcheck / racecheck ($1)"
  timeout 80 compute-sanitizer --tool memcheck $B/paged_attention_test --gtest_filter="$1" \
    > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
  timeout 80 compute-sanitizer --tool racecheck $B/paged_attention_test --gtest_filter="$1" \
    > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -3 "$OUT/racecheck.log"
fi
if [ "${2:-0}" = 1 ]; then
  echo "== ncu (the default decode kernel, tensor cores, 512-token segments)"
  TL_BENCH_ONLY=decode timeout 40 ncu --kernel-name regex:DecodeMma --launch-skip 5 \
    --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section LaunchStats $B/gpu_attention_bench /tmp/ncu.json > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occ|Registers|Issued Warp|No Eligible|Warp Cycles Per Issued|Block Limit" "$OUT/ncu.txt" | head -20
fi
(cd "$OUT" && tar czf logs.tgz device.txt $(ls sdpa.log sdpa.json memcheck.log racecheck.log ncu.txt bench[0-9]*.json 2>/dev/null) && rm -f device.txt sdpa.log sdpa.json memcheck.log racecheck.log ncu.txt bench[0-9]*.json)
