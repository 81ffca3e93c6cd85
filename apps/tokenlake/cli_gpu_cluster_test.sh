#!/usr/bin/env bash
# GPU instance processes end to end (docs/adr/0018; a CUDA build's binary on a machine with an
# NVIDIA GPU): a `tokenlake coordinator` (bf16 plan costs) and two `tokenlake instance --device
# gpu` processes sharing GPU 0, over the fixture model tests/fixtures/llama_tiny/model. Checks:
#   - both instances register and become ready (their arenas relayed and mapped);
#   - each fixture prompt, sent twice through /v1/completions (greedy), gives the same tokens
#     as `tokenlake generate --device gpu` on one in-process instance, and its repeat is served
#     from the pool (cached tokens > 0);
#   - the instances read each other's slots (tokenlake_remote_attend_calls_total or
#     tokenlake_kv_pulled_segments_total > 0 on /metrics), and the pool holds segments on both;
#   - the same through `serve --device gpu`, and through `serve --peer-access host` (every peer
#     reached through host staging, as instances on different GPUs or hosts are).
# Exits non-zero naming what failed.
#
# Usage: cli_gpu_cluster_test.sh PATH/TO/tokenlake [OUT_DIR]
set -u -o pipefail
bin="$1"
root="$(cd "$(dirname "$0")/../.." && pwd)"
model="$root/tests/fixtures/llama_tiny/model"
prompts="$root/tests/fixtures/llama_tiny/prompts.jsonl"
keep=0
if [ $# -ge 2 ]; then
  out="$2"
  keep=1
  mkdir -p "$out"
else
  out="$(mktemp -d)"
fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  [ "$keep" -eq 1 ] || rm -rf "$out"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

slots=64
max_new=4
export TOKENLAKE_CLUSTER_SECRET
TOKENLAKE_CLUSTER_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')

# The reference: one in-process GPU instance, the prompts in order.
timeout 120 "$bin" generate --model "$model" --prompts "$prompts" --max-new-tokens "$max_new" \
  --segment-tokens 16 --arrival sequential --device gpu --instances 1 \
  --json "$out/reference.json" >/dev/null || fail "generate --device gpu (the reference)"

# check_prompts HTTP_PORT: every fixture prompt twice, greedy: tokens equal the reference's, the
# repeat served from the pool.
check_prompts() {
  python3 - "$1" "$prompts" "$out/reference.json" "$max_new" <<'PY'
import json, sys, urllib.request
http, prompts_path, ref_path, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = [json.loads(l)["input_ids"] for l in open(prompts_path) if l.strip()]
ref = json.load(open(ref_path))
ref_tokens = [r["tokens"] for r in ref["results"]]
bad = 0
for i, p in enumerate(prompts):
    for attempt in (0, 1):
        body = json.dumps({"model": "model", "prompt": p, "max_tokens": max_new,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        r = json.load(urllib.request.urlopen(req, timeout=60))
        toks = r["choices"][0].get("tokens")
        cached = r.get("usage", {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
        if toks != ref_tokens[i]:
            print(f"FAIL: prompt {i} attempt {attempt}: {toks} != generate's {ref_tokens[i]}")
            bad += 1
        if attempt == 1 and len(p) > 16 and cached <= 0:
            print(f"FAIL: prompt {i}: the repeat was not served from the pool")
            bad += 1
sys.exit(1 if bad else 0)
PY
}

"$bin" coordinator --model "$model" --instances 2 --slots "$slots" --kv-dtype bf16 \
  --segment-tokens 16 --port-file "$out/coordinator.ports" >"$out/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -s "$out/coordinator.ports" ] && break; sleep 0.1; done
[ -s "$out/coordinator.ports" ] || fail "the coordinator did not write its ports"
read -r http grpc < <(python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); print(p["http_port"], p["grpc_port"])' "$out/coordinator.ports")
for i in 0 1; do
  "$bin" instance --device gpu --gpu 0 --model "$model" --coordinator-port "$grpc" --id "$i" \
    --name "gpu-$i" --slots "$slots" --segment-tokens 16 --exit-with-parent \
    >"$out/instance-$i.log" 2>&1 &
  pids+=($!)
done
ready=0
for _ in $(seq 1 600); do
  ready=$(curl -s "http://127.0.0.1:$http/healthz" |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("live_instances", 0))' 2>/dev/null)
  [ "${ready:-0}" = "2" ] && break
  sleep 0.1
done
[ "${ready:-0}" = "2" ] || fail "2 GPU instances did not become ready (logs in $out)"

check_prompts "$http" || exit 1
metrics=$(curl -s "http://127.0.0.1:$http/metrics")
remote=$(echo "$metrics" | awk '/^tokenlake_remote_attend_calls_total /{a=$2} /^tokenlake_kv_pulled_segments_total /{b=$2} END{print a+b}')
[ "${remote%.*}" -gt 0 ] 2>/dev/null || fail "no instance read the other's slots (remote attends + pulls = $remote)"
echo "$metrics" | grep -E '^tokenlake_instance_segments\{' >"$out/segments.txt"
[ "$(awk '$2 > 0' "$out/segments.txt" | wc -l)" -eq 2 ] || fail "the pool does not hold segments on both instances: $(tr '\n' ' ' <"$out/segments.txt")"
echo "ok: 2 GPU instance processes: tokens equal generate's, repeats cached, $remote cross-instance reads"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
wait 2>/dev/null
pids=()

# The same through `tokenlake serve --device gpu` (its coordinator and two GPU instances).
# Each instance gets 2% of the GPU; the pool what its weights and a 512 MiB reserve leave.
"$bin" serve --model "$model" --device gpu --instances 2 --memory-fraction 0.02 --reserve-mib 512 --segment-tokens 16 \
  --log-dir "$out" --port-file "$out/serve.port" --duration-s 300 >"$out/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do [ -s "$out/serve.port" ] && break; sleep 0.1; done
[ -s "$out/serve.port" ] || fail "serve --device gpu did not start (logs in $out: $(tail -n 3 "$out/serve.log"))"
check_prompts "$(cat "$out/serve.port")" || fail "serve --device gpu answered wrong"
served_slots=$(sed -n 's/.*on GPU 0, \([0-9]*\) slots each.*/\1/p' "$out/serve.log")
[ "${served_slots:-0}" -gt 1000 ] || fail "serve --memory-fraction 0.02 gave ${served_slots:-no} slots per instance"
grep -q "(GPU 0, $served_slots bf16 slots)" "$out"/tokenlake-instance-0-*.log ||
  fail "serve's instance 0 does not say it runs on the GPU: $(head -n 3 "$out"/tokenlake-instance-0-*.log)"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
wait 2>/dev/null
pids=()

# Host staging (as between GPUs or hosts): `serve --peer-access host` maps no arena; each
# instance reads the other's segments through fetches into its staging cache, stores carry bytes,
# and tails stay on the computing instance (the coordinator's device domains). Same answers.
"$bin" serve --model "$model" --device gpu --instances 2 --slots "$slots" --segment-tokens 16 \
  --peer-access host --log-dir "$out/host" --port-file "$out/host.port" --duration-s 300 \
  >"$out/serve-host.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do [ -s "$out/host.port" ] && break; sleep 0.1; done
[ -s "$out/host.port" ] || fail "serve --peer-access host did not start (logs in $out/host: $(tail -n 3 "$out/serve-host.log"))"
check_prompts "$(cat "$out/host.port")" || fail "serve --peer-access host answered wrong"
metrics=$(curl -s "http://127.0.0.1:$(cat "$out/host.port")/metrics")
host_remote=$(echo "$metrics" | awk '/^tokenlake_remote_attend_calls_total /{a=$2} /^tokenlake_kv_pulled_segments_total /{b=$2} END{print a+b}')
[ "${host_remote%.*}" -gt 0 ] 2>/dev/null || fail "with host staging no instance read the other's slots (remote attends + pulls = $host_remote)"
echo "ok: serve --peer-access host: tokens equal generate's, $host_remote cross-instance reads through host staging"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
wait 2>/dev/null
pids=()

# --peer-access is a GPU instance's choice.
msg=$("$bin" serve --model "$model" --instances 2 --peer-access host --duration-s 1 2>&1)
[ $? -eq 2 ] && echo "$msg" | grep -q -- "--device gpu" ||
  fail "serve --peer-access host on the CPU: want exit 2 naming --device gpu, got: $msg"

# A share that leaves no room, and shares that add up to more than the GPU, are refused.
msg=$("$bin" instance --device gpu --model "$model" --coordinator-port 1 --memory-fraction 0.001 \
  --reserve-mib 100000 2>&1)
[ $? -eq 1 ] && echo "$msg" | grep -q "not one slot" ||
  fail "instance --memory-fraction too small: want exit 1 naming the bytes, got: $msg"
msg=$("$bin" serve --model "$model" --device gpu --instances 3 --memory-fraction 0.4 --duration-s 1 2>&1)
[ $? -eq 2 ] && echo "$msg" | grep -q "more than all of it" ||
  fail "serve with 3 x 0.4 of a GPU: want exit 2, got: $msg"
echo "cli_gpu_cluster_test: 2 GPU instance processes (by hand and by serve --device gpu --memory-fraction: $served_slots slots each): tokens equal generate's, repeats cached, $remote cross-instance reads; through host staging $host_remote"
