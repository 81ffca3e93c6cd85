#!/usr/bin/env bash
# Device call 4 (final): the full bench/gpu_attention.sh session (tests, our bench with the sm90
# prefill beside the mma.sync kernels, SDPA, profile, report) on build/e-cuda (linked as
# build/cuda, the path the script uses), one ncu of the sm90 prefill kernel, and an experiment
# built in build/e-exp (-DTOKENLAKE_SM90_EXP=1: block sizes cached in the tile iterator,
# O rescale skipped when no max of the warp changed): its tests and prefill timings.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT" build
[ -e build/cuda ] || ln -s e-cuda build/cuda
S=/tmp/final_summary.txt
STEP_TIMEOUT=120 bash bench/gpu_attention.sh 2>&1 | tee $S
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/e-cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
echo "== ncu (sm90 prefill, --clock-control none)" | tee -a $S
TL_BENCH_ONLY=prefill_cached_sm90 timeout 90 ncu --clock-control none --kernel-name regex:PrefillSm90 \
  --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
  --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
  build/e-cuda/bin/gpu_attention_bench /tmp/ncu.json > /tmp/ncu_final.txt 2>&1
echo "ncu rc=$?" | tee -a $S
grep -E "Duration|SM Frequency|Throughput|Warp Cycles Per Issued" /tmp/ncu_final.txt | tee -a $S
grep -E "issue_stalled" /tmp/ncu_final.txt | sort -k3 -g -r | head -6 | tee -a $S
echo "== experiment (build/e-exp)" | tee -a $S
timeout 100 build/e-exp/bin/paged_attention_test \
  --gtest_filter='*Sm90*:*CachedAndNew*:*MatchesReferenceOnRandomInputs*' > /tmp/exp_test.log 2>&1
echo "exp paged_attention_test rc=$?" | tee -a $S
grep -E "^\[  (FAILED|PASSED) |Failure" /tmp/exp_test.log | head -8 | tee -a $S
TL_BENCH_ONLY=prefill_ timeout 80 build/e-exp/bin/gpu_attention_bench /tmp/exp_bench.json \
  > /tmp/exp_bench.log 2>&1
echo "exp bench rc=$?" | tee -a $S
grep -E "^run|prefill" /tmp/exp_bench.log | tee -a $S
tar czf "$OUT/extra.tgz" -C /tmp final_summary.txt ncu_final.txt exp_test.log exp_bench.json exp_bench.log
ls "$OUT"
