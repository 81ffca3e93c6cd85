#!/usr/bin/env bash
# The whole GPU evidence in one run, on the code as committed:
#   1. every GPU test (the ctest label `gpu`: paged attention, device arena and its sharing
#      between processes, NCCL transport, the engine on the GPU against the transformers
#      fixture and against the CPU engine), then
#      apps/tokenlake/cli_gpu_test.sh (`tokenlake generate --device gpu` against the fixture);
#   2. bench/gpu_attention.sh: our kernels, PyTorch SDPA on the same shapes in the same run,
#      and the comparison report (its own profile step is skipped: 3. is the real CLI);
#   3. `tokenlake profile --json` (the simulator's GPU profile) and a `tokenlake sim --gpu`
#      smoke run on it.
# Runs on any machine with an NVIDIA GPU. The CUDA build needs nvcc but no GPU, so it may be made
# on another machine and copied (build/cuda/bin and build/cuda/devlibs):
#   cmake --preset cuda -DTOKENLAKE_BUILD_BENCHMARKS=OFF
#   cmake --build --preset cuda -j2 --target tokenlake paged_attention_test device_arena_test \
#     peer_arena_test gpu_attention_bench gpu_merge_bench nccl_channel_test nccl_attention_test \
#     gpu_engine_test gpu_engine_fixture_test gpu_checkpoint_test
#   bash bench/pack_devlibs.sh build/cuda
#
#   bash bench/gpu_session.sh [OUT_DIR]     # OUT_DIR: default ./out
#
# Results go to OUT_DIR: the main results as files, the secondary logs packed into one archive.
set -u -o pipefail
OUT=${1:-${OUT:-out}}
mkdir -p "$OUT"
B=build/cuda/bin
export LD_LIBRARY_PATH="$PWD/build/cuda/devlibs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
mkdir -p "$OUT/extra"
git_rev=$(cat build/cuda/REVISION 2>/dev/null || echo unknown)
echo "revision: $git_rev" | tee "$OUT/extra/revision.txt"

echo "== GPU tests"
for t in paged_attention_test device_arena_test peer_arena_test nccl_channel_test \
  nccl_attention_test gpu_engine_test gpu_engine_fixture_test gpu_checkpoint_test; do
  timeout 150 "$B/$t" > "$OUT/extra/$t.log" 2>&1
  rc=$?
  echo "$t rc=$rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/extra/$t.log" | tr '\n' ' ')"
done

echo "== tokenlake generate --device gpu (the CLI against transformers)"
timeout 300 bash apps/tokenlake/cli_gpu_test.sh "$B/tokenlake" > "$OUT/extra/cli_gpu_test.log" 2>&1
echo "cli_gpu_test.sh rc=$? $(tail -n 1 "$OUT/extra/cli_gpu_test.log")"

echo "== kernels beside SDPA"
SKIP_PROFILE=1 STEP_TIMEOUT=150 TEST_FILTER='-*' bash bench/gpu_attention.sh "$OUT/extra/attn" \
  > "$OUT/extra/gpu_attention.log" 2>&1
echo "gpu_attention.sh rc=$?"
cp "$OUT/extra/attn/report.txt" "$OUT/report.txt"
cp "$OUT/extra/attn/bench.log" "$OUT/bench.log"
cp "$OUT/extra/attn/tokenlake_bench.json" "$OUT/tokenlake_bench.json"
cp "$OUT/extra/attn/sdpa.json" "$OUT/sdpa.json"
[ -f "$OUT/extra/attn/merge.json" ] && cp "$OUT/extra/attn/merge.json" "$OUT/merge.json"
cat "$OUT/report.txt"

echo "== tokenlake profile"
timeout 200 "$B/tokenlake" profile --json "$OUT/h100.json" \
  --dense-tokens 1 16 64 128 256 512 1024 2048 4096 8192 16384 > "$OUT/extra/profile.log" 2>&1
echo "profile rc=$?"
tail -5 "$OUT/extra/profile.log"
timeout 60 "$B/tokenlake" sim --gpu "$OUT/h100.json" > "$OUT/extra/sim.log" 2>&1
echo "sim rc=$?"
tail -8 "$OUT/extra/sim.log"

(cd "$OUT" && tar czf logs.tgz extra && rm -rf extra)
