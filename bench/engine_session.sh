#!/usr/bin/env bash
# The GPU engine's evidence in one run (issue 12's measurements), on the code as built:
#   tests:  the GPU engine's tests (small_batch_gemm_test, decode_gemm_test, gpu_engine_test,
#           gpu_engine_fixture_test, gpu_checkpoint_test, device_pool_test,
#           peer_device_pool_test: two processes)
#           and apps/tokenlake/cli_gpu_test.sh (`tokenlake generate --device gpu` against the
#           transformers fixture) and cli_gpu_cluster_test.sh (two `tokenlake instance --device
#           gpu` processes on one GPU behind a coordinator);
#   bench:  `tokenlake bench engine` for each model of MODELS (default llama2-7b llama3-8b):
#           decode at batches 1-128 over 2K and 16K contexts, prefill at 4K and 32K tokens, the
#           workloads (64 requests sharing documents; sixteen 2K prompts), each against the bounds
#           measured in the same run; writes bench_engine_MODEL.json and the workloads' prompts;
#   cluster: bench/serve_workload.py: bench's first workload (its prompts, its shape with random
#           weights) through `tokenlake serve --device gpu --instances N` (N = CLUSTER_INSTANCES,
#           default 2; processes sharing the GPU): completion time and the cross-process data
#           plane (bytes and time per layer) beside the in-process run; needs bench;
#   ab:     the small-batch kernel against cuBLAS: `bench engine --sections dense` (every
#           projection alone at 1-32 rows), then decode at batches 1-8 with the kernel up to 8
#           rows (--small-batch-rows 8) and with cuBLAS only (--small-batch-rows 0), and at
#           batches 1-64 with the kernels launched one after another (--no-pdl);
#   hf:     bench/hf_generate.py (transformers' static-cache batched generate) on those prompts;
#   ckpt:   bench/checkpoint_load.sh (a 13.5 GB sharded bf16 checkpoint from the page cache);
#   profile: `tokenlake profile` (the simulator's GPU profile, Llama-3-8B dense layers);
#   sim:    the simulator's prediction of the llama3-8b workload run (issue 12, item 6): the
#           bench's prompts as a trace (bench/prompts_to_trace.py), `tokenlake sim --trace ...
#           --instances 1 --gpu profile.json --model llama-3-8b --policies tokenlake`, its
#           completion time (makespan_s) beside the engine's measured seconds in
#           bench_engine_llama3-8b.json with their ratio (bench/sim_vs_engine.py; needs bench and
#           profile: the profile's forward_ms is what the simulator charges per iteration).
#
#   bash bench/engine_session.sh OUT_DIR [BUILD_DIR]     # BUILD_DIR: default build/cuda
#   PARTS="bench hf" MODELS=llama2-7b bash bench/engine_session.sh out
#
# Runs on any machine with an NVIDIA GPU and the project's CUDA build (made there, or elsewhere
# and copied with bench/pack_devlibs.sh). BENCH_ARGS adds flags to every `bench engine`. Each
# step has a time limit (STEP_TIMEOUT seconds, default 300) and the next step runs whatever the
# last one did; the summary lines go to stdout, the logs to OUT_DIR.
set -u -o pipefail
OUT=${1:?usage: bench/engine_session.sh OUT_DIR [BUILD_DIR]}
BUILD=${2:-build/cuda}
PARTS=${PARTS:-tests bench cluster ab hf ckpt profile sim}
MODELS=${MODELS:-llama2-7b llama3-8b}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
mkdir -p "$OUT"
B="$BUILD/bin"
export LD_LIBRARY_PATH="$PWD/$BUILD/devlibs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export TOKENLAKE_SOURCE_DIR=${TOKENLAKE_SOURCE_DIR:-$PWD}
export PYTHONUNBUFFERED=1
# The JSONs name the commit the binaries were built from (BUILD/REVISION, written when a build is
# copied to another machine), not whatever the checkout here is at.
if [ -z "${TOKENLAKE_REVISION:-}" ] && [ -f "$BUILD/REVISION" ]; then
  TOKENLAKE_REVISION=$(cat "$BUILD/REVISION")
  export TOKENLAKE_REVISION
fi
wants() { [[ " $PARTS " == *" $1 "* ]]; }
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started)) s] $*"; }

{
  echo "revision: $(cat "$BUILD/REVISION" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
} | tee "$OUT/machine.txt"

if wants tests; then
  for t in small_batch_gemm_test decode_gemm_test gpu_engine_test gpu_engine_fixture_test \
    gpu_checkpoint_test device_pool_test peer_device_pool_test; do
    timeout "$STEP_TIMEOUT" "$B/$t" > "$OUT/$t.log" 2>&1
    stamp "$t rc=$? $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/$t.log" | tr '\n' ' ')"
  done
  timeout "$STEP_TIMEOUT" bash apps/tokenlake/cli_gpu_test.sh "$B/tokenlake" \
    > "$OUT/cli_gpu_test.log" 2>&1
  stamp "cli_gpu_test.sh rc=$? $(tail -n 1 "$OUT/cli_gpu_test.log")"
  timeout "$STEP_TIMEOUT" bash apps/tokenlake/cli_gpu_cluster_test.sh "$B/tokenlake" \
    "$OUT/cluster" > "$OUT/cli_gpu_cluster_test.log" 2>&1
  stamp "cli_gpu_cluster_test.sh rc=$? $(tail -n 1 "$OUT/cli_gpu_cluster_test.log")"
fi

if wants bench; then
  for m in $MODELS; do
    # shellcheck disable=SC2086
    timeout "$STEP_TIMEOUT" "$B/tokenlake" bench engine --model "$m" \
      --json "$OUT/bench_engine_$m.json" --prompts "$OUT/prompts_$m.json" ${BENCH_ARGS:-} \
      > "$OUT/bench_engine_$m.log" 2>&1
    stamp "bench engine $m rc=$?"
    grep -E 'decode:|prefill:|workload|error|Error' "$OUT/bench_engine_$m.log" | tr -d '\r'
  done
fi

if wants cluster; then
  for m in $MODELS; do
    [ -f "$OUT/bench_engine_$m.json" ] && [ -f "$OUT/prompts_$m.json" ] || continue
    timeout "$STEP_TIMEOUT" python3 bench/serve_workload.py --bin "$B/tokenlake" \
      --bench "$OUT/bench_engine_$m.json" --prompts "$OUT/prompts_$m.json" \
      --instances "${CLUSTER_INSTANCES:-2}" --json "$OUT/serve_workload_$m.json" \
      --work-dir "$OUT/serve_$m" > "$OUT/serve_workload_$m.log" 2>&1
    stamp "serve_workload $m rc=$?"
    grep -E '^workload|^  ' "$OUT/serve_workload_$m.log"
  done
fi

if wants ab; then
  for m in $MODELS; do
    timeout "$STEP_TIMEOUT" "$B/tokenlake" bench engine --model "$m" --sections dense decode \
      --decode-batches 1 2 4 8 --decode-contexts 2048 --decode-steps 16 --small-batch-rows 8 \
      --json "$OUT/bench_small_batch_$m.json" > "$OUT/bench_small_batch_$m.log" 2>&1
    stamp "bench engine --small-batch-rows 8 $m rc=$?"
    grep -E 'decode: b' "$OUT/bench_small_batch_$m.log" | tr -d '\r'
    timeout "$STEP_TIMEOUT" "$B/tokenlake" bench engine --model "$m" --sections decode \
      --decode-batches 1 2 4 8 --decode-contexts 2048 --decode-steps 16 --small-batch-rows 0 \
      --json "$OUT/bench_cublas_$m.json" > "$OUT/bench_cublas_$m.log" 2>&1
    stamp "bench engine --small-batch-rows 0 $m rc=$?"
    grep -E 'decode: b' "$OUT/bench_cublas_$m.log" | tr -d '\r'
    timeout "$STEP_TIMEOUT" "$B/tokenlake" bench engine --model "$m" --sections decode \
      --decode-batches 1 4 8 32 64 --decode-contexts 2048 --decode-steps 16 --no-pdl \
      --json "$OUT/bench_nopdl_$m.json" > "$OUT/bench_nopdl_$m.log" 2>&1
    stamp "bench engine --no-pdl $m rc=$?"
    grep -E 'decode: b' "$OUT/bench_nopdl_$m.log" | tr -d '\r'
  done
fi

if wants hf; then
  for m in $MODELS; do
    [ -f "$OUT/prompts_$m.json" ] || continue
    timeout "$STEP_TIMEOUT" python3 bench/hf_generate.py --prompts "$OUT/prompts_$m.json" \
      --json "$OUT/hf_$m.json" > "$OUT/hf_$m.log" 2>&1
    stamp "hf_generate $m rc=$?"
    grep -E '^\{' "$OUT/hf_$m.log"
  done
fi

if wants ckpt; then
  timeout "$STEP_TIMEOUT" bash bench/checkpoint_load.sh "$OUT" "$BUILD" > "$OUT/ckpt.out" 2>&1
  stamp "checkpoint_load.sh rc=$?"
  tail -n 4 "$OUT/ckpt.out"
fi

if wants profile; then
  timeout "$STEP_TIMEOUT" "$B/tokenlake" profile --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1
  stamp "profile rc=$?"
fi
if wants sim && [ -f "$OUT/profile.json" ] && [ -f "$OUT/prompts_llama3-8b.json" ] &&
  [ -f "$OUT/bench_engine_llama3-8b.json" ]; then
  for w in shared-prefix-64 sixteen-2k; do
    python3 bench/prompts_to_trace.py --prompts "$OUT/prompts_llama3-8b.json" --workload "$w" \
      --out "$OUT/trace_$w.jsonl" || continue
    timeout "$STEP_TIMEOUT" "$B/tokenlake" sim --trace "$OUT/trace_$w.jsonl" --instances 1 \
      --gpu "$OUT/profile.json" --model llama-3-8b --policies tokenlake \
      --json "$OUT/sim_$w.json" > "$OUT/sim_$w.log" 2>&1
    stamp "sim $w rc=$?"
  done
  echo "the simulator (sim_*.json) against the engine:"
  python3 bench/sim_vs_engine.py --bench "$OUT/bench_engine_llama3-8b.json" --sim-dir "$OUT" \
    --prefix sim_ | tee "$OUT/sim_vs_engine.txt"
fi
stamp "done"
