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
expect "unknown policy lists the valid ones" 2 \
  "unknown policy 'mooncake'.*round-robin, least-load, cache-aware, pd-disagg, pd-disagg\+dram, tokenlake" \
  -- "$bin" sim --policies round-robin,mooncake
expect "unknown workload lists the valid ones" 2 "unknown workload 'chats'.*chat, agent, docqa, loogle, scbench or sharegpt" -- \
  "$bin" sim --workload chats
expect "unknown gpu lists the built-in ones" 2 "gpu 'a100x'.*h100, h100-paper" -- \
  "$bin" sim --gpu a100x
expect "a split with no decode instance is refused with the valid range" 2 \
  "16:0.*decode phase with no instance.*1P:15D to 15P:1D" -- "$bin" sim --pd-splits 16:0
expect "a split that does not add up is refused" 2 "7P:8D.*16 instances" -- \
  "$bin" sim --pd-splits 7P:8D
printf '{"name": "m", "num_layers": 0.5}\n' >"$tmp/model_half.json"
expect "a fractional integer field in a model file names file and field" 2 \
  "model_half.json: field 'num_layers' must be an integer" -- \
  "$bin" sim --requests 10 --model "$tmp/model_half.json"
printf '{"attn_decode_gbps": 0}\n' >"$tmp/gpu_zero.json"
expect "a zero bandwidth in a GPU file names file and field" 2 \
  "gpu_zero.json: field 'attn_decode_gbps' must be > 0" -- \
  "$bin" sim --requests 10 --gpu "$tmp/gpu_zero.json"
expect "an unknown dispatch rule is refused with the valid ones" 2 "tl-dispatch.*matching.*greedy" -- \
  "$bin" sim --requests 10 --policies tokenlake --tl-dispatch best
expect "a negative access slack is refused naming the flag" 2 "tl-access-slack" -- \
  "$bin" sim --requests 10 --policies tokenlake --tl-access-slack -0.5
expect "the matching dispatch runs and reports both rules' bytes" 0 "tokenlake" -- \
  "$bin" sim --workload chat --requests 200 --instances 4 --policies tokenlake \
  --tl-dispatch matching --tl-dispatch-compare --json "$tmp/dispatch.json"
if python3 - "$tmp/dispatch.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
c = r["policy_counters"]
assert c["dispatch_batches"] > 0 and c["dispatch_holders"] > 0, c
assert c["dispatch_query_bytes"] > 0 and c["dispatch_other_query_bytes"] > 0, c
assert json.load(open(sys.argv[1]))["config"]["tokenlake_dispatch"] == "matching"
PY
then
  echo "ok: dispatch comparison in the JSON"
  passes=$((passes + 1))
else
  echo "FAIL: dispatch comparison in the JSON"
  failures=$((failures + 1))
fi
expect "sim writes JSON for every policy and PD split" 0 "tokenlake" -- \
  "$bin" sim --requests 60 --instances 4 --json "$tmp/out.json"
if python3 - "$tmp/out.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
names = [r["policy"] for r in results]
assert names == ["round-robin", "cache-aware", "pd-disagg 1P:3D", "pd-disagg 2P:2D",
                 "pd-disagg 3P:1D", "tokenlake"], names
keys = {"policy", "throughput_rps", "hit_rate", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s",
        "tpot_p90_s", "bytes_moved", "redundancy", "load_imbalance", "slo_attainment",
        "kv_capacity_bytes_per_instance", "kv_capacity_bytes_total"}
for r in results:
    missing = keys - r.keys()
    assert not missing, (r["policy"], missing)
pd = [r for r in results if "pd_split" in r]
assert [r["pd_split"] for r in pd] == ["1P:3D", "2P:2D", "3P:1D"], pd
assert sum(r["best_pd_split"] for r in pd) == 1, pd
assert len({r["kv_capacity_bytes_per_instance"] for r in results}) == 1
PY
then
  echo "ok: sim JSON schema (one row per PD split, exactly one best)"
  passes=$((passes + 1))
else
  echo "FAIL: sim JSON schema"
  failures=$((failures + 1))
fi

# The paper preset: its values, explicit flags over them, bad names listing the valid ones.
expect "sim refuses an unknown preset, listing the valid ones" 2 "unknown preset 'nope'.*paper" -- \
  "$bin" sim --preset nope
expect "sim refuses an unknown SLO mode" 2 "p90 or per-token" -- "$bin" sim --slo p99
expect "sim refuses a TP that does not divide the KV heads" 2 "--tp 3" -- "$bin" sim --tp 3
expect "sim refuses --kv-gb with --cache-tokens" 2 "exclusive" -- \
  "$bin" sim --kv-gb 10 --cache-tokens 100000
expect "sim refuses a --kv-gb beyond 64-bit bytes" 2 "--kv-gb must be at most 1e9" -- \
  "$bin" sim --kv-gb 1e12
expect "sim tokenlake refuses more KV blocks than the pool counts, naming the setting" 2 \
  "tokenlake policy: the KV capacity per instance.*--cache-tokens" -- \
  "$bin" sim --workload chat --requests 20 --cache-tokens 100000000000000 --policies tokenlake
expect "sim refuses --cache-tokens beyond 64-bit bytes" 2 "more KV bytes than 64 bits" -- \
  "$bin" sim --workload chat --requests 20 --cache-tokens 2000000000000000000
expect "sim refuses an unknown question order, listing the valid ones" 2 \
  "question order 'random'.*shuffled or by-document" -- \
  "$bin" sim --workload loogle --requests 12 --question-order random
expect "sim refuses --question-order for another workload" 2 "loogle only" -- \
  "$bin" sim --workload chat --requests 12 --question-order by-document
expect "sim runs LooGLE with each document's questions together" 0 "loogle: 12 requests" -- \
  "$bin" sim --preset paper --requests 12 --question-order by-document --policies tokenlake
expect "sim --preset paper runs the paper's setup" 0 \
  "loogle: 12 requests.*4 x A100-SXM4-80GB.*\(TP 2\), lwm-7b; SLO per token" -- \
  "$bin" sim --preset paper --requests 12 --cache-tokens 400000 --json "$tmp/paper.json"
override="sharegpt: 12 requests.*2 x A100-SXM4-80GB \(from published specifications\), lwm-7b"
expect "explicit flags override the preset" 0 "$override" -- \
  "$bin" sim --preset paper --workload sharegpt --requests 12 --instances 2 --tp 1 \
  --policies cache-aware
if python3 - "$tmp/paper.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
c = d["config"]
assert (c["preset"], c["instances"], c["tensor_parallel"], c["model"], c["slo_mode"],
        c["token_budget"], c["cache_tokens"]) == ("paper", 4, 2, "lwm-7b", "per-token", 8192,
                                                  400000), c
assert [r["policy"] for r in d["results"]][:1] == ["cache-aware"], d["results"]
for r in d["results"]:
    assert {"hit_rate", "cv_cache_access", "slo_attainment"} <= r.keys(), r
    # 400,000 / 4 instances = 100,000 tokens = 195 whole blocks of 512 tokens x 512 KiB.
    assert r["kv_capacity_bytes_per_instance"] == 195 * 512 * 524288, r
PY
then
  echo "ok: sim --preset paper JSON"
  passes=$((passes + 1))
else
  echo "FAIL: sim --preset paper JSON"
  failures=$((failures + 1))
fi

# A gzip-compressed trace reads like the plain one; --requests keeps its first N requests.
repo="$(cd "$(dirname "$0")/../.." && pwd)"
gzip -c "$repo/tests/fixtures/sim_conversation_200.jsonl" >"$tmp/trace.jsonl.gz"
expect "a .gz trace is read, --requests cuts it" 0 "30 requests" -- \
  "$bin" sim --trace "$tmp/trace.jsonl.gz" --requests 30 --policies round-robin
expect "pd-disagg+dram states its store" 0 \
  "pd-disagg\+dram 1P:1D also uses a host-DRAM KV store: 64.0 GB per prefill instance" -- \
  "$bin" sim --requests 20 --instances 2 --policies pd-disagg+dram --pd-dram-gb 64

# The simulator against the GPU engine's measurements (bench/sim_vs_engine.py, which
# bench/engine_session.sh runs): four requests at once on one
# instance; bench JSONs whose measured seconds are the simulation's own completion time, twice
# it, and one naming a workload that was not simulated.
mkdir -p "$tmp/vs"
for k in 0 1 2 3; do
  echo "{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 8, \"hash_ids\": [$((2 * k)), $((2 * k + 1))]}"
done >"$tmp/vs/trace_four.jsonl"
"$bin" sim --trace "$tmp/vs/trace_four.jsonl" --instances 1 --policies tokenlake \
  --json "$tmp/vs/sim_four.json" >/dev/null 2>&1
python3 - "$tmp/vs" <<'PY'
import json, os, sys
d = sys.argv[1]
makespan = json.load(open(os.path.join(d, "sim_four.json")))["results"][0]["makespan_s"]
for name, workload, seconds in [("same", "four", makespan), ("double", "four", 2 * makespan),
                                ("other", "other", makespan)]:
    json.dump({"commit": "x", "device": {"name": "GPU"}, "model": {"name": "m"},
               "workloads": [{"name": workload, "seconds": seconds, "pool_hit_rate": 0.0}]},
              open(os.path.join(d, f"bench_{name}.json"), "w"))
PY
expect "sim_vs_engine: the simulation's own time is within 15%" 0 \
  "four +[0-9.]+ +[0-9.]+ +1\.000 .*dense_ms +within 15%" -- \
  python3 "$repo/bench/sim_vs_engine.py" --bench "$tmp/vs/bench_same.json" --sim-dir "$tmp/vs"
expect "sim_vs_engine: half the engine's time is outside" 1 "0\.500 .*OUTSIDE 15%" -- \
  python3 "$repo/bench/sim_vs_engine.py" --bench "$tmp/vs/bench_double.json" --sim-dir "$tmp/vs"
expect "sim_vs_engine: a workload without a simulation is named" 2 "no simulation of 'other'" -- \
  python3 "$repo/bench/sim_vs_engine.py" --bench "$tmp/vs/bench_other.json" --sim-dir "$tmp/vs"
# A profile with a forward_ms table (as `tokenlake profile` measures it): tokens -> ms.
echo '{"attn_prefill_tflops": 1, "forward_ms": [[8, 6.1], [1000, 49.97]]}' >"$tmp/vs/profile_fwd.json"
expect "sim charges a profile's forward_ms and says so" 0 "forward_ms" -- \
  "$bin" sim --trace "$tmp/vs/trace_four.jsonl" --instances 1 --policies tokenlake \
  --gpu "$tmp/vs/profile_fwd.json"

fixture="$repo/tests/fixtures/llama_tiny"
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

# Sampling: the same seed gives the same tokens (whatever the arrival order), a stop token ends
# a request, bad sampling flags are usage errors.
gen6=("$bin" generate --model "$model" --prompts "$tmp/prompts2.jsonl" --max-new-tokens 6)
samp=("${gen6[@]}" --temperature 1.5 --top-k 50 --top-p 0.95)
expect "generate rejects top-p 0" 2 "--top-p" -- "${samp[@]}" --top-p 0 --json "$tmp/s0.json"
expect "generate rejects sampling without the pool" 2 "need the pool" -- \
  "${samp[@]}" --no-pool --json "$tmp/s0.json"
expect "generate samples with a seed" 0 "2 prompts" -- "${samp[@]}" --seed 7 --json "$tmp/s1.json"
expect "generate samples with the same seed, one prompt after another" 0 "2 prompts" -- \
  "${samp[@]}" --seed 7 --arrival sequential --json "$tmp/s2.json"
expect "generate samples with another seed" 0 "2 prompts" -- \
  "${samp[@]}" --seed 8 --json "$tmp/s3.json"
first=$(python3 -c "import json; print(json.load(open('$tmp/gen_all.json'))['results'][0]['greedy'][0])")
expect "generate stops at a stop token" 0 "2 prompts" -- \
  "${gen6[@]}" --stop-token "$first" --json "$tmp/s4.json"
if python3 - "$tmp/s1.json" "$tmp/s2.json" "$tmp/s3.json" "$tmp/s4.json" "$tmp/gen_all.json" <<'PY'
import json, sys
a, b, c, stop, greedy = (json.load(open(p)) for p in sys.argv[1:])
ta = [r["tokens"] for r in a["results"]]
assert ta == [r["tokens"] for r in b["results"]], "same seed, other tokens"
assert ta != [r["tokens"] for r in c["results"]], "another seed, the same tokens"
assert all(len(t) == 6 for t in ta) and all(r["finish_reason"] == "length" for r in a["results"])
g = [r["greedy"] for r in greedy["results"]]
s = stop["results"][0]
assert s["tokens"] == g[0][:1] and s["finish_reason"] == "stop", s["tokens"]
PY
then
  echo "ok: generate sampling (seeded repeatability, another seed differs, stop tokens)"
  passes=$((passes + 1))
else
  echo "FAIL: generate sampling"
  failures=$((failures + 1))
fi

# The same model as shards (model.safetensors.index.json + 3 files, split by an independent
# writer: Python's standard library) gives the same outputs; a broken index is named.
sharded="$tmp/sharded"
mkdir -p "$sharded"
cp "$model/config.json" "$sharded/"
python3 - "$model/model.safetensors" "$sharded" <<'PY'
import json, struct, sys
src, out = sys.argv[1], sys.argv[2]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
names = sorted(k for k in header if k != "__metadata__")
weight_map = {}
for s in range(3):
    file = "model-%05d-of-00003.safetensors" % (s + 1)
    h, blob = {}, b""
    for name in names[s::3]:
        b, e = header[name]["data_offsets"]
        h[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                   "data_offsets": [len(blob), len(blob) + e - b]}
        blob += data[b:e]
        weight_map[name] = file
    text = json.dumps(h).encode()
    open(out + "/" + file, "wb").write(struct.pack("<Q", len(text)) + text + blob)
json.dump({"metadata": {"total_size": len(data)}, "weight_map": weight_map},
          open(out + "/model.safetensors.index.json", "w"))
PY
expect "generate reads a sharded checkpoint" 0 "2 prompts" -- "$bin" generate --model "$sharded" \
  --prompts "$tmp/prompts2.jsonl" --max-new-tokens 2 --arrival sequential --json "$tmp/gen_sharded.json"
if python3 - "$tmp/gen.json" "$tmp/gen_sharded.json" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert [r["greedy"] for r in a["results"]] == [r["greedy"] for r in b["results"]]
assert [r["last_logits"] for r in a["results"]] == [r["last_logits"] for r in b["results"]]
assert b["load_seconds"] >= 0, b.get("load_seconds")
PY
then
  echo "ok: the sharded checkpoint gives the single file's outputs"
  passes=$((passes + 1))
else
  echo "FAIL: the sharded checkpoint's outputs"
  failures=$((failures + 1))
fi
echo '{"weight_map": {"model.norm.weight": "../model.safetensors"}}' \
  >"$sharded/model.safetensors.index.json"
expect "generate names a shard path that leaves the folder" 1 \
  "model.safetensors.index.json.*model.norm.weight.*leave the checkpoint folder" -- \
  "$bin" generate --model "$sharded" --prompts "$tmp/prompts2.jsonl" --json "$tmp/gen_bad.json"

# The cluster daemons (only when built with the service module): bad lake flags are usage errors.
if "$bin" --help 2>&1 | grep -q coordinator; then
  expect "coordinator rejects a lake of 0 instances" 2 "lake_instances 0" -- \
    "$bin" coordinator --model "$model" --instances 0
  expect "coordinator rejects more instances than the cluster holds" 2 "lake_instances 65" -- \
    "$bin" coordinator --model "$model" --instances 65
  expect "coordinator rejects a bad KV dtype" 2 "kv-dtype" -- \
    "$bin" coordinator --model "$model" --kv-dtype f16
  expect "coordinator rejects an unknown routing rule" 2 "routing" -- \
    "$bin" coordinator --model "$model" --routing nearest
  expect "coordinator rejects a decode budget outside (0, 1]" 2 "decode-budget" -- \
    "$bin" coordinator --model "$model" --decode-budget 0
  expect "coordinator rejects a GPU profile it cannot find" 2 "gpu.*no-such-gpu" -- \
    "$bin" coordinator --model "$model" --gpu no-such-gpu
  expect "instance rejects a zero data-plane timeout" 2 "data-timeout-ms" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --data-timeout-ms 0
  expect "instance without an address names --coordinator and --etcd" 2 \
    "coordinator's address: --coordinator HOST:PORT.*--coordinator-port PORT.*--etcd URL" -- \
    "$bin" instance --model "$model"
  expect "instance rejects a coordinator port of 0" 2 "coordinator-port.*not in range" -- \
    "$bin" instance --model "$model" --coordinator-port 0
  expect "instance --memory-fraction needs --device gpu" 2 "--memory-fraction.*--device gpu" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --memory-fraction 0.5
  expect "instance --load-format dummy needs --device gpu" 2 "dummy.*--device gpu" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --load-format dummy
  expect "instance rejects a memory fraction above 1" 2 "memory-fraction" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --device gpu --memory-fraction 1.5
  expect "instance --peer-access needs --device gpu" 2 "--peer-access.*--device gpu" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --peer-access host
  expect "instance rejects an unknown peer access" 2 "peer-access.*ipc" -- \
    "$bin" instance --model "$model" --coordinator-port 1 --device gpu --peer-access ipc
fi

# The tokenizer (only when built with the tokenizer module).
if "$bin" --help 2>&1 | grep -q tokenize; then
  tokdir="$(cd "$(dirname "$0")/../.." && pwd)/tests/fixtures/tokenizer"
  expect "tokenize prints ids with BOS" 0 '^\{"ids":\[756,' -- \
    "$bin" tokenize --model "$tokdir/bpe_llama3" "Hello world"
  expect "tokenize --decode prints the text" 0 '^\{"text":"<\|begin_of_text\|>Hello world"\}' -- \
    "$bin" tokenize --model "$tokdir/bpe_llama3" --decode \
    "$("$bin" tokenize --model "$tokdir/bpe_llama3" "Hello world" | sed 's/^{"ids":\(.*\)}$/\1/')"
  expect "tokenize --chat renders the template" 0 'start_header_id\|>user.*"ids":\[756,' -- \
    "$bin" tokenize --model "$tokdir/bpe_llama3" --chat '[{"role":"user","content":"hi"}]'
  expect "a template's raise_exception is a usage error with its message" 2 \
    "Conversation roles must alternate" -- "$bin" tokenize --model "$tokdir/bpe_llama3" --chat \
    '[{"role":"user","content":"a"},{"role":"user","content":"b"}]'
  expect "a folder without a tokenizer is named" 1 "no tokenizer.json or tokenizer.model" -- \
    "$bin" tokenize --model "$tmp" "hi"
  # serve: a checkpoint whose vocabulary does not cover its tokenizer is refused at startup.
  if "$bin" --help 2>&1 | grep -q serve; then
    fixtures="$(cd "$(dirname "$0")/../.." && pwd)/tests/fixtures"
    mkdir -p "$tmp/small_vocab"
    cp "$fixtures/llama_tiny/model/config.json" "$fixtures/tokenizer/bpe_gpt2/tokenizer.json" \
      "$tmp/small_vocab/"
    expect "serve refuses a tokenizer the model's vocabulary does not cover" 1 \
      "knows ids up to 759, the model's vocabulary has only 512 rows" -- \
      "$bin" serve --model "$tmp/small_vocab" --instances 1 --duration-s 1
    expect "serve refuses an unknown routing rule, naming the valid ones" 2 \
      "--routing.*scheduler.*plan" -- \
      "$bin" serve --model "$fixtures/llama_tiny/model" --routing nearest --duration-s 1
    expect "serve rejects an unknown device" 2 "--device.*tpu" -- \
      "$bin" serve --model "$fixtures/llama_tiny/model" --device tpu --duration-s 1
    expect "serve --memory-fraction needs --device gpu" 2 "--memory-fraction.*--device gpu" -- \
      "$bin" serve --model "$fixtures/llama_tiny/model" --memory-fraction 0.5 --duration-s 1
    expect "serve --peer-access needs --device gpu" 2 "--peer-access.*--device gpu" -- \
      "$bin" serve --model "$fixtures/llama_tiny/model" --peer-access host --duration-s 1
    expect "serve --memory-fraction excludes --slots" 2 "excludes" -- \
      "$bin" serve --model "$fixtures/llama_tiny/model" --device gpu --memory-fraction 0.5 \
      --slots 64 --duration-s 1
    if ! "$bin" generate --help 2>&1 | grep -q "this build: cpu and gpu"; then
      expect "serve --device gpu in a build without CUDA says how to get one" 2 \
        "no GPU instance backend.*cmake --preset cuda" -- \
        "$bin" serve --model "$fixtures/llama_tiny/model" --device gpu --duration-s 1
    fi
    expect "serve names a GPU profile it cannot read" 2 "--gpu: .*no-such-gpu.json" -- \
      "$bin" serve --model "$fixtures/llama_tiny/model" --gpu "$tmp/no-such-gpu.json" \
      --duration-s 1
    # serve passes its routing flags to its coordinator: with --routing scheduler a completion
    # is placed by the scheduler (counted under rule="scheduler" on /metrics). Its log folder is
    # made if missing.
    "$bin" serve --model "$fixtures/llama_tiny/model" --instances 2 --routing scheduler \
      --duration-s 60 --port-file "$tmp/serve.port" --log-dir "$tmp/serve-logs/a" >/dev/null 2>&1 &
    serve_pid=$!
    for _ in $(seq 1 300); do
      [ -s "$tmp/serve.port" ] && break
      sleep 0.1
    done
    serve_port=$(cat "$tmp/serve.port" 2>/dev/null)
    curl -s -X POST "http://127.0.0.1:$serve_port/v1/completions" \
      -H 'Content-Type: application/json' \
      -d '{"model":"model","prompt":[1,2,3,4,5],"max_tokens":2}' >/dev/null
    expect "serve --routing scheduler reaches its coordinator" 0 \
      'tokenlake_routes_total\{rule="scheduler"\} 1' -- \
      curl -s "http://127.0.0.1:$serve_port/metrics"
    expect "serve makes its log folder" 0 "tokenlake-coordinator-.*log" -- \
      ls "$tmp/serve-logs/a"
    kill "$serve_pid" 2>/dev/null
    wait "$serve_pid" 2>/dev/null
  fi
fi

# TLS files for a cluster: a CA and a host certificate, then a second host signed by that CA.
expect "certs makes a CA and a host certificate" 0 '"new_ca":true.*"198.51.100.4"' -- \
  "$bin" certs --out "$tmp/tls-a" --host node-a --host 198.51.100.4
expect "certs signs a second host with the first's CA" 0 '"new_ca":false.*"node-b"' -- \
  "$bin" certs --out "$tmp/tls-b" --host node-b --ca "$tmp/tls-a"
expect "the second host's certificate verifies against the CA" 0 "OK" -- \
  openssl verify -CAfile "$tmp/tls-a/ca.pem" "$tmp/tls-b/cert.pem"
expect "certs refuses a host that is not a name or an address" 2 "'no such host!'" -- \
  "$bin" certs --out "$tmp/tls-c" --host "no such host!"
expect "certs names a CA folder without a CA key" 2 "tls-b/ca-key.pem" -- \
  "$bin" certs --out "$tmp/tls-c" --ca "$tmp/tls-b"

# bench coordinator: a small run writes the four headline figures (and no plan failed).
if "$bin" bench --help 2>&1 | grep -q coordinator; then
  expect "bench coordinator smoke run" 0 "wrote .*coordinator.json" -- \
    "$bin" bench coordinator --instances 4 --segments 20000 --seconds 1 --warmup-seconds 0.2 \
    --json "$tmp/coordinator.json"
  expect "bench coordinator JSON has the headline keys and no errors" 0 "^ok$" -- \
    python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
keys = ["plans_per_s", "plans_per_s_with_reconcile", "plan_p99_ms", "plan_p99_ms_with_reconcile"]
ok = all(j[k] > 0 for k in keys) and j["plan_errors"] == 0 and j["heartbeat_errors"] == 0
ok = ok and j["reports_with_reconcile"]["changes"] > 0 and j["pool_segments_at_start"] >= 20000
print("ok" if ok else j)' "$tmp/coordinator.json"
  expect "bench coordinator refuses more instances than a lake holds" 2 "instances" -- \
    "$bin" bench coordinator --instances 65 --json "$tmp/x.json"
fi

echo "cli: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
