#!/usr/bin/env bash
# Device call 2 for the sm90 prefill kernel: its three development variants
# (TOKENLAKE_SM90_VARIANT = 1 all-threads + __syncthreads, 2 warp-specialised with intra-warpgroup
# overlap, 3 warp-specialised without), each: GPU tests, prefill timings, ncu; memcheck/racecheck
# on the default. Binaries from build/e-cuda with libraries in build/e-cuda/devlibs.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
B=build/e-cuda/bin
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/e-cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
cuobjdump -sass $B/paged_attention_test 2>/dev/null | awk '/Function :/{f=$3} /GMMA/{n[f]++} END{for (k in n) print "GMMA", n[k], k}' | grep -i sm90
for v in 4 2 3 1; do
  export TOKENLAKE_SM90_VARIANT=$v
  echo "== variant $v tests"
  f='*Sm90*:*CachedAndNew*'; [ $v = 4 ] && f='*Sm90*:*CachedAndNew*:*MatchesReferenceOnRandomInputs*'
  timeout 100 $B/paged_attention_test --gtest_filter="$f" > "$OUT/test_v$v.log" 2>&1
  echo "paged_attention_test rc=$?"
  grep -E "^\[  (FAILED|PASSED) |Failure|relative|Which is|q=" "$OUT/test_v$v.log" | head -12
  TL_BENCH_ONLY=prefill_ timeout 60 $B/gpu_attention_bench "$OUT/bench_v$v.json" 2>&1 | grep -E "sm90|rc=|error" 
done
export TOKENLAKE_SM90_VARIANT=4
for v in 4; do
  TOKENLAKE_SM90_VARIANT=$v TL_BENCH_ONLY=prefill_cached_sm90 timeout 100 ncu --kernel-name regex:PrefillSm90 \
    --launch-skip 3 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
    $B/gpu_attention_bench /tmp/ncu.json > "$OUT/ncu_v$v.txt" 2>&1
  echo "ncu v$v rc=$?"; grep -E "Duration|SM Frequency|Throughput|Warp Cycles Per Issued|Issued Ipc|gmma|Eligible" "$OUT/ncu_v$v.txt" | head -20
  grep -E "issue_stalled" "$OUT/ncu_v$v.txt" | sort -k3 -g -r | head -12
done
timeout 100 compute-sanitizer --tool memcheck $B/paged_attention_test --gtest_filter='*Sm90*H8_KV2_D128_S64' > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -2 "$OUT/memcheck.log"
timeout 100 compute-sanitizer --tool racecheck $B/paged_attention_test --gtest_filter='*Sm90*H8_KV2_D128_S64' > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -2 "$OUT/racecheck.log"
cd "$OUT" && tar czf logs.tgz *.log ncu_v*.txt bench_v*.json && rm -f test_v1.log test_v2.log test_v3.log bench_v1.json bench_v2.json bench_v3.json
