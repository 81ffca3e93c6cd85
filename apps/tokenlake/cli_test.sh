#!/usr/bin/env bash
# End-to-end checks of the `tokenlake` CLI's contract: exit codes, error messages, JSON output.
# Usage: cli_test.sh PATH/TO/tokenlake
set -u
bin="$1"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0
passes=0

# expect NAME WANT_CODE PATTERN -- COMMAND...: runs COMMAND, checks its exit code and that its
# combined output matches the extended regex PATTERN.
expect() {
  local name="$1" want="$2" pattern="$3"
  shift 4
  local out code
  out="$("$@" 2>&1)"
  code=$?
  if [ "$code" -ne "$want" ] || ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAIL: $name: exit $code (want $want), output:"
    head -n 20 <<<"$out" | sed 's/^/  | /'
    failures=$((failures + 1))
  else
    echo "ok: $name"
    passes=$((passes + 1))
  fi
}

expect "help exits 0" 0 "Subcommands" -- "$bin" --help
expect "unknown flag is a usage error" 2 "bogus" -- "$bin" sim --bogus
expect "malformed value is a usage error" 2 "rate" -- "$bin" sim --rate abc
expect "missing trace names the file" 2 "no-such-trace.jsonl" -- \
  "$bin" sim --trace "$tmp/no-such-trace.jsonl"
printf '{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}\n{"timestamp": 1, "input_length": "x"}\n' \
  >"$tmp/bad.jsonl"
expect "malformed trace line names file, line and field" 2 "bad.jsonl:2.*input_length" -- \
  "$bin" sim --trace "$tmp/bad.jsonl"
expect "sim writes JSON for the four policies" 0 "tokenlake" -- \
  "$bin" sim --requests 60 --json "$tmp/out.json"
if python3 - "$tmp/out.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
names = [r["policy"] for r in results]
assert names == ["round-robin", "cache-aware", "pd-disagg", "tokenlake"], names
keys = {"policy", "throughput_rps", "hit_rate", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s",
        "tpot_p90_s", "bytes_moved", "redundancy", "load_imbalance"}
for r in results:
    missing = keys - r.keys()
    assert not missing, (r["policy"], missing)
PY
then
  echo "ok: sim JSON schema"
  passes=$((passes + 1))
else
  echo "FAIL: sim JSON schema"
  failures=$((failures + 1))
fi

fixture="$(cd "$(dirname "$0")/../.." && pwd)/tests/fixtures/llama_tiny"
model="$fixture/model"

# generate: --device. `generate --help` says what this build runs ("this build: cpu and gpu"
# in a CUDA build).
expect "generate help names --device" 0 "--device" -- "$bin" generate --help
head -n 2 "$fixture/prompts.jsonl" >"$tmp/prompts2.jsonl"
gen=("$bin" generate --model "$model" --prompts "$tmp/prompts2.jsonl" --max-new-tokens 2)
expect "generate rejects an unknown device" 2 "--device.*tpu" -- \
  "${gen[@]}" --json "$tmp/gen.json" --device tpu
expect "generate rejects a bad KV dtype" 2 "--kv-dtype.*f16" -- \
  "${gen[@]}" --json "$tmp/gen.json" --kv-dtype f16
if "$bin" generate --help 2>&1 | grep -q "this build: cpu and gpu"; then
  # A CUDA build: flags the GPU engine has no counterpart for are refused before any GPU work.
  expect "generate --device gpu refuses --no-pool" 2 "--no-pool" -- \
    "${gen[@]}" --json "$tmp/gen.json" --device gpu --no-pool
  expect "generate --device gpu refuses --rebalance-every" 2 "--rebalance-every" -- \
    "${gen[@]}" --json "$tmp/gen.json" --device gpu --rebalance-every 2
  expect "generate --device gpu refuses f32 KV" 2 "--kv-dtype f32" -- \
    "${gen[@]}" --json "$tmp/gen.json" --device gpu --kv-dtype f32
  if ! nvidia-smi -L >/dev/null 2>&1; then
    expect "generate --device gpu without a GPU says so" 1 "no CUDA device is visible" -- \
      "${gen[@]}" --json "$tmp/gen.json" --device gpu
  fi
else
  expect "generate --device gpu in a build without CUDA says how to get one" 2 \
    "no CUDA data plane.*cmake --preset cuda.*make cuda" -- \
    "${gen[@]}" --json "$tmp/gen.json" --device gpu
fi
expect "generate rejects a bad arrival order" 2 "--arrival.*random" -- \
  "${gen[@]}" --json "$tmp/gen.json" --arrival random
expect "generate on the CPU writes JSON" 0 "2 prompts" -- "${gen[@]}" --json "$tmp/gen.json" \
  --arrival sequential
expect "generate with every prompt at once writes JSON" 0 "2 prompts" -- \
  "${gen[@]}" --json "$tmp/gen_all.json"
if python3 - "$tmp/gen.json" "$tmp/gen_all.json" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
both = json.load(open(sys.argv[2]))
# All at once (the default): both prompts ran in one iteration, and batching changes no output.
assert both["arrival"] == "all" and out["arrival"] == "sequential", (both["arrival"], out["arrival"])
assert both["max_batch_requests"] == 2, both["max_batch_requests"]
assert out["max_batch_requests"] == 1, out["max_batch_requests"]
for a, b in zip(out["results"], both["results"]):
    assert a["greedy"] == b["greedy"], (a["greedy"], b["greedy"])
    assert max(abs(x - y) for x, y in zip(a["last_logits"], b["last_logits"])) <= 1e-4
assert out["device"] == "cpu", out["device"]
assert out["kv_dtype"] == "f32", out["kv_dtype"]  # auto on the CPU
assert out["pool"] is True and "lake" in out and "transport" in out, sorted(out)
keys = {"line", "prompt_tokens", "greedy", "cached_tokens", "last_logits", "remote_attend_calls",
        "pulled_segments", "stored_segments", "remote_stored_segments"}
assert len(out["results"]) == 2
for r in out["results"]:
    assert keys <= r.keys(), keys - r.keys()
    assert len(r["greedy"]) == 2 and len(r["last_logits"]) == 512
assert out["results"][1]["cached_tokens"] == 32, out["results"][1]["cached_tokens"]  # 36 shared
PY
then
  echo "ok: generate CPU JSON (device cpu, f32, schema, shared prefix served from the pool in" \
    "sequence, the same outputs with both prompts in one batch)"
  passes=$((passes + 1))
else
  echo "FAIL: generate CPU JSON"
  failures=$((failures + 1))
fi

# The cluster daemons (only when built with the service module): bad lake flags are usage errors.
if "$bin" --help 2>&1 | grep -q coordinator; then
  expect "coordinator rejects a lake of 0 instances" 2 "lake_instances 0" -- \
    "$bin" coordinator --model "$model" --instances 0
  expect "coordinator rejects more instances than the cluster holds" 2 "lake_instances 65" -- \
    "$bin" coordinator --model "$model" --instances 65
  expect "coordinator rejects a bad KV dtype" 2 "kv-dtype" -- \
    "$bin" coordinator --model "$model" --kv-dtype f16
  expect "instance rejects a zero data-plane timeout" 2 "data-timeout-ms" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --data-timeout-ms 0
fi

echo "cli: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
