#!/usr/bin/env bash
# Regenerates every simulator output under docs/results/ that docs/results.md quotes, with the
# commands written there. Run from the repository root:
#   docs/results/regenerate.sh [path/to/tokenlake]     (default build/release/bin/tokenlake)
# The Mooncake trace is read from ../shared/traces/conversation_trace.jsonl. Takes a few minutes
# on 2 cores (the four main --max-rate runs about 30 s of them).
set -euo pipefail
B=${1:-build/release/bin/tokenlake}
T=../shared/traces/conversation_trace.jsonl
timed() {  # timed OUT.txt CMD...: stdout + stderr and the wall/user time into OUT.txt
  local out=$1
  shift
  /usr/bin/time -f "%e s wall, %U s user" -o /tmp/tl_time.$$ "$@" >"$out" 2>&1
  cat /tmp/tl_time.$$ >>"$out"
  rm -f /tmp/tl_time.$$
}
# Main results (the default: the H100 measured in the final GPU session, commit 75dad69).
timed docs/results/conversation.txt $B sim --trace $T --max-rate --json docs/results/conversation.json --report docs/results/conversation
timed docs/results/chat.txt  $B sim --workload chat  --requests 10000 --max-rate --json docs/results/chat.json  --report docs/results/chat
timed docs/results/agent.txt $B sim --workload agent --requests 10000 --max-rate --json docs/results/agent.json --report docs/results/agent
timed docs/results/docqa.txt $B sim --workload docqa --requests 10000 --max-rate --json docs/results/docqa.json --report docs/results/docqa
# The same four with the paper-derived profile that was the default before.
for w in chat agent docqa; do
  timed docs/results/${w}_paper_gpu.txt $B sim --workload $w --requests 10000 --max-rate --gpu h100-paper --json docs/results/${w}_paper_gpu.json
done
timed docs/results/conversation_paper_gpu.txt $B sim --trace $T --max-rate --gpu h100-paper --json docs/results/conversation_paper_gpu.json
# The same four with the measured profile that was the default before the final GPU session
# (06:23 UTC, commit 8293061: decode 2,339 GB/s with the CUDA-core decode kernel).
P=bench/results/h100-profile-cli/h100.json
for w in chat agent docqa; do
  timed docs/results/${w}_0623_gpu.txt $B sim --workload $w --requests 10000 --max-rate --gpu $P --json docs/results/${w}_0623_gpu.json
done
timed docs/results/conversation_0623_gpu.txt $B sim --trace $T --max-rate --gpu $P --json docs/results/conversation_0623_gpu.json
# The same four with the first measured profile, whose prefill figure is the mma.sync kernel's.
M=bench/results/h100-profile-cli/mma-sync/h100.json
for w in chat agent docqa; do
  timed docs/results/${w}_mma_sync_gpu.txt $B sim --workload $w --requests 10000 --max-rate --gpu $M --json docs/results/${w}_mma_sync_gpu.json
done
timed docs/results/conversation_mma_sync_gpu.txt $B sim --trace $T --max-rate --gpu $M --json docs/results/conversation_mma_sync_gpu.json
# Mooncake with its host-DRAM store.
timed docs/results/conversation_pd_dram.txt $B sim --trace $T --max-rate --policies pd-disagg+dram --pd-dram-gb 200 --json docs/results/conversation_pd_dram.json
timed docs/results/docqa_pd_dram.txt $B sim --workload docqa --requests 10000 --max-rate --policies pd-disagg+dram --pd-dram-gb 200 --json docs/results/docqa_pd_dram.json
# Sensitivity rows.
: >docs/results/sensitivity.txt
sens() {
  echo "\$ tokenlake sim $*" | sed "s|$T|conversation_trace.jsonl|" >>docs/results/sensitivity.txt
  $B sim "$@" 2>/dev/null | grep -E '^(least-load|tokenlake|cache-aware|round-robin|pd-disagg) ' >>docs/results/sensitivity.txt
}
sens --trace $T --max-rate --policies least-load
sens --trace $T --max-rate --policies tokenlake --tl-decode-reserve 0.1
sens --workload chat --requests 10000 --max-rate --policies tokenlake --tl-decode-reserve 0.1
sens --trace $T --max-rate --policies tokenlake --tl-decode-reserve 0.5
sens --workload chat --requests 10000 --max-rate --policies tokenlake --tl-decode-reserve 0.5
sens --trace $T --max-rate --policies tokenlake --tl-max-dop 1
sens --workload agent --requests 10000 --max-rate --policies tokenlake --tl-max-dop 1
sens --trace $T --max-rate --policies tokenlake --tl-local-evict 2
sens --workload agent --requests 10000 --max-rate --policies tokenlake --tl-local-evict 2
sens --workload docqa --requests 10000 --max-rate --policies tokenlake --tl-local-evict 2
# Figures quoted in the text of docs/results.md (one rate each).
: >docs/results/extra.txt
extra() {
  echo "\$ tokenlake sim $*" | sed "s|$T|conversation_trace.jsonl|" >>docs/results/extra.txt
  $B sim "$@" 2>&1 | grep -v '^\[' >>docs/results/extra.txt
}
extra --trace $T --rate 16 --policies pd-disagg
extra --trace $T --policies tokenlake --tl-local-evict 0 --json /tmp/tl_local_evict0.json
python3 -c "import json; r=json.load(open('/tmp/tl_local_evict0.json'))['results'][0]; print('bytes_moved_by_kind (TB):', {k: round(v / 1e12, 2) for k, v in r['bytes_moved_by_kind'].items()})" >>docs/results/extra.txt
extra --trace $T --rate 23 --policies cache-aware,tokenlake
