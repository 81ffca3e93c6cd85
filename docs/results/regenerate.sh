#!/usr/bin/env bash
# Regenerates the simulator outputs under docs/results/ that docs/results.md quotes. Run from the
# repository root, after `make build`:
#   docs/results/regenerate.sh [path/to/tokenlake]     (default build/release/bin/tokenlake)
# The real traces are read from ../shared/traces/. (docs/results/paper_reproduction.sh makes the
# outputs of docs/paper-reproduction.md.)
set -euo pipefail
B=${1:-build/release/bin/tokenlake}
T=../shared/traces
D=docs/results
# shellcheck source=docs/results/timed.sh
source "$(dirname "$0")/timed.sh"
# Main results: 16 x H100, Llama-3-8B, P90 TTFT <= 5 s and P90 TPOT <= 0.2 s.
timed $D/conversation.txt $B sim --trace $T/conversation_trace.jsonl --max-rate \
  --json $D/conversation.json --report $D/conversation
timed $D/synthetic.txt $B sim --trace $T/synthetic_trace.jsonl --max-rate --json $D/synthetic.json
for w in chat agent docqa; do
  timed $D/$w.txt $B sim --workload $w --requests 10000 --max-rate --json $D/$w.json --report $D/$w
done
# The long-context trace at its own rate (its prompts alone exceed a 5 s TTFT: its max rates
# under the paper's per-token SLO are in docs/results/paper/claude_h100.txt).
timed $D/claude.txt $B sim --trace $T/claude_code_trace.jsonl.gz --json $D/claude.json
# Mooncake with its host-DRAM store (an extra row, not the default).
timed $D/conversation_pd_dram.txt $B sim --trace $T/conversation_trace.jsonl --max-rate \
  --policies pd-disagg+dram --pd-splits 9P:7D
# Sensitivity of TokenLake's own knobs, on the conversation trace.
: >$D/sensitivity.txt
for flags in "--tl-decode-budget 0.25" "--tl-decode-budget 1" "--tl-max-dop 1" \
  "--tl-local-evict 2" "--tl-dispatch matching" "--tl-admission lpm" "--tl-access-slack 0.25"; do
  echo "\$ tokenlake sim --trace conversation_trace.jsonl --max-rate --policies tokenlake $flags" \
    >>$D/sensitivity.txt
  # shellcheck disable=SC2086
  $B sim --trace $T/conversation_trace.jsonl --max-rate --policies tokenlake $flags 2>/dev/null |
    grep -E '^tokenlake ' >>$D/sensitivity.txt
done
