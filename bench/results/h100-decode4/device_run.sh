#!/usr/bin/env bash
# One device call for decode4 (two KV heads per tensor-core decode block): the GPU tests, the
# decode rows named in ROWS (TL_BENCH_ONLY syntax: comma-separated prefixes, 'name$' = exact)
# REPEAT times, ncu of one launch per row prefix in NCU_ROWS (sections and the per-SM active
# cycle spread), compute-sanitizer memcheck and racecheck of the tests in SAN (if set).
# Binaries from build/g-cuda (cmake --preset cuda -B build/g-cuda -DTOKENLAKE_BUILD_BENCHMARKS=OFF;
# bash bench/pack_devlibs.sh build/g-cuda). Results go to $OUT (run.log beside logs.tgz).
#   [REPEAT=N] [ROWS=...] [NCU_ROWS="a b"] [SAN=filter] [TESTS=filter] bash device_run.sh
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT/l"
B=build/g-cuda/bin
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/g-cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
  --format=csv | tee "$OUT/l/device.txt"
echo "== tests (${TESTS:-all})"
timeout 120 $B/paged_attention_test --gtest_filter="${TESTS:-*}" > "$OUT/test.log" 2>&1
echo "paged_attention_test rc=$?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|relative|Which is|error" "$OUT/test.log" | head -30
for i in $(seq 1 "${REPEAT:-1}"); do
  echo "== bench $i"
  TL_BENCH_ONLY="${ROWS:-decode}" timeout 150 $B/gpu_attention_bench "$OUT/l/bench$i.json" \
    > "$OUT/l/bench$i.log" 2>&1
  echo "gpu_attention_bench ($i) rc=$?"
  grep -E "^(device|read-only stream over 128|decode[a-z0-9_]*) " "$OUT/l/bench$i.log"
done
for row in ${NCU_ROWS:-}; do
  echo "== ncu ($row, first launch after 5 of the row's first shape)"
  TL_BENCH_ONLY="$row" timeout 60 ncu --kernel-name regex:DecodeMma --launch-skip 5 \
    --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats \
    --metrics sm__cycles_active.avg,sm__cycles_active.min,sm__cycles_active.max,sm__cycles_elapsed.max,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,gpu__time_duration.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct,dram__sectors_read.sum \
    $B/gpu_attention_bench /tmp/ncu.json > "$OUT/l/ncu_$row.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occ|Registers Per|Issued Warp|No Eligible|Warp Cycles Per Issued|Block Limit Sh|sm__cycles|dram__|gpu__time|lts__|Grid Size|Threads  " "$OUT/l/ncu_$row.txt" | head -40
done
if [ -n "${SAN:-}" ]; then
  echo "== memcheck / racecheck ($SAN)"
  timeout 80 compute-sanitizer --tool memcheck $B/paged_attention_test --gtest_filter="$SAN" \
    > "$OUT/l/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -3 "$OUT/l/memcheck.log"
  timeout 80 compute-sanitizer --tool racecheck $B/paged_attention_test --gtest_filter="$SAN" \
    > "$OUT/l/racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -3 "$OUT/l/racecheck.log"
fi
(cd "$OUT" && tar czf logs.tgz l && rm -rf l)
