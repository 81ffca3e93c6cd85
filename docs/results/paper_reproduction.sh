#!/usr/bin/env bash
# Regenerates the simulator outputs that docs/paper-reproduction.md quotes (docs/results/paper/).
# Run from the repository root, after `make build`:
#   docs/results/paper_reproduction.sh [path/to/tokenlake]   (default build/release/bin/tokenlake)
# The real traces are read from ../shared/traces/. SCBench runs on 400 requests to bound the time.
set -euo pipefail
B=${1:-build/release/bin/tokenlake}
T=../shared/traces
D=docs/results/paper
mkdir -p $D
# shellcheck source=docs/results/timed.sh
source "$(dirname "$0")/timed.sh"
P="cache-aware,pd-disagg,tokenlake,tokenlake-static"
# The paper's setup: 4 instances of 2 x A100-80GB (TP 2), LWM-7B, per-token SLO, P90 goodput.
timed $D/loogle.txt $B sim --preset paper --workload loogle --requests 6448 --max-rate --policies $P
for c in 200000 400000 800000; do
  timed $D/loogle_$c.txt $B sim --preset paper --workload loogle --requests 6448 --max-rate \
    --cache-tokens $c --policies $P
done
# The same with each document's questions one after another (--question-order by-document).
timed $D/loogle_by_document.txt $B sim --preset paper --workload loogle --requests 6448 --max-rate \
  --question-order by-document --policies $P
for c in 200000 400000 800000; do
  timed $D/loogle_by_document_$c.txt $B sim --preset paper --workload loogle --requests 6448 \
    --max-rate --question-order by-document --cache-tokens $c --policies $P
done
timed $D/sharegpt.txt $B sim --preset paper --workload sharegpt --requests 10000 --max-rate --policies $P
timed $D/scbench.txt $B sim --preset paper --workload scbench --requests 400 --max-rate --policies $P
# The three real traces under the paper preset and under the default 16 x H100 cluster, both
# with the paper's per-token SLO.
# The long-context trace is cut to its first 5,000 requests (about 1.2 hours) to bound the time.
for t in conversation_trace.jsonl synthetic_trace.jsonl claude_code_trace.jsonl.gz; do
  n=${t%%_trace*}
  cut=()
  [ "$n" = claude_code ] && cut=(--requests 5000)
  timed $D/${n}_paper.txt $B sim --preset paper --trace $T/$t "${cut[@]}" --max-rate --policies $P
  timed $D/${n}_h100.txt $B sim --trace $T/$t "${cut[@]}" --slo per-token --max-rate \
    --policies round-robin,cache-aware,pd-disagg,tokenlake
done
