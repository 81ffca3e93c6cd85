#!/usr/bin/env bash
# One device call for the extra partials fused into the decode kernel's merge
# (PagedAttentionParams::num_extra): the full paged_attention_test, compute-sanitizer memcheck of
# the tests in SAN, the GPU engine's tests (gpu_engine_test, gpu_engine_fixture_test,
# pool_steps_test) when present, gpu_merge_bench three times. Binaries from build/i-cuda
# (cmake --preset cuda -B build/i-cuda -DTOKENLAKE_BUILD_BENCHMARKS=OFF; bash
# bench/pack_devlibs.sh build/i-cuda). Results go to $OUT.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
B=build/i-cuda/bin
cuda_lib=$(dirname "$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$PWD/build/i-cuda/devlibs:$cuda_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
  --format=csv | tee "$OUT/device.txt"
echo "== paged_attention_test (${TESTS:-all})"
timeout 90 $B/paged_attention_test --gtest_filter="${TESTS:-*}" > "$OUT/test.log" 2>&1
echo "paged_attention_test rc=$?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|relative|Which is|error|tests from .* ran" \
  "$OUT/test.log" | head -30
SAN=${SAN-*ExtraPartials*H8_KV2_D128_S64:*ExtraPartials*H8_KV1_D64_S256:*ExtraPartials*H4_KV2_D16_S16}
if [ -n "$SAN" ]; then
  echo "== memcheck ($SAN)"
  timeout 55 compute-sanitizer --tool memcheck $B/paged_attention_test --gtest_filter="$SAN" \
    > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"
  tail -4 "$OUT/memcheck.log"
fi
for t in gpu_engine_test gpu_engine_fixture_test pool_steps_test; do
  [ -x "$B/$t" ] || continue
  timeout 60 "$B/$t" > "$OUT/$t.log" 2>&1
  echo "$t rc=$? $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/$t.log" | tr '\n' ' ')"
done
for i in 1 2 3; do
  echo "== gpu_merge_bench $i"
  timeout 25 $B/gpu_merge_bench "$OUT/merge$i.json" 2>&1 | tee "$OUT/merge$i.log"
  echo "gpu_merge_bench ($i) rc=$?"
done
