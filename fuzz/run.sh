#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a bounded time.
# Usage: fuzz/run.sh [seconds per target, default 20] [build dir, default build/fuzz]
# Exit status: non-zero if a target crashes (its reproducer is left in the build dir).
set -euo pipefail
seconds="${1:-20}"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${2:-$root/build/fuzz}"
CXX="${CXX:-clang++-14}"
command -v "$CXX" >/dev/null || CXX=clang++
CXX="$CXX" cmake -S "$root/fuzz" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j2
for target in openai_request content_decoding mooncake_trace safetensors checkpoint_index \
    ipc_handle chat_template tokenizer; do
  corpus="$build/corpus/$target"
  mkdir -p "$corpus"
  echo "fuzz: $target for ${seconds}s"
  (cd "$build" && "./fuzz_$target" -max_total_time="$seconds" -max_len=65536 -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 "$corpus" "$root/fuzz/corpus/$target" 2>&1 |
      tail -n 12)
done
