#!/usr/bin/env bash
# `tokenlake generate --device gpu` against Hugging Face transformers, end to end through the CLI
# (on a machine with an NVIDIA GPU; a CUDA build's binary). For each fixture model of
# tests/fixtures/llama_tiny (see its README), serves prompts.jsonl in order:
#   gpu1: --device gpu, 1 instance;  gpu3: --device gpu, 3 instances + --rotate-compute;
#   cpu:  --device cpu, 1 instance (the CPU engine, f32 KV), same segment size (16);
# and checks, per prompt (the rules of src/tokenlake/engine/cuda/gpu_engine_fixture_test.cc):
#   - last_logits within the GPU engine's bf16 tolerance of transformers' (gpu_test_util.h:
#     max|d| <= 0.02 * max|logit| + 0.02), on all three runs;
#   - greedy token k equals transformers' where that step is decided by a margin (min_margin,
#     or the first / last step's top-1 minus top-2 gap, > 2 x tolerance) and every earlier token
#     matched (the CLI does not teacher-force: after a near tie flips a token, later steps are
#     on another sequence and are not compared);
#   - cached_tokens equals the independent oracle (fixture_test_util.h's ExpectedCachedTokens
#     over the run's own histories: prompt + every generated token but the last), and is equal
#     between gpu1, gpu3 and cpu for every prompt whose earlier histories are the same in both
#     runs;
#   - gpu3 serves cached segments from other instances (remote attends + pulls > 0); the GPU
#     JSON says device "gpu", a gpu_name, kv_dtype bf16, and has a lake but no transport section.
# Exits non-zero naming the model, run and prompt of every mismatch.
#
# Usage: cli_gpu_test.sh PATH/TO/tokenlake [OUT_DIR]   (OUT_DIR keeps the JSON; default a temp dir)
set -u -o pipefail
bin="$1"
root="$(cd "$(dirname "$0")/../.." && pwd)"
fx="$root/tests/fixtures/llama_tiny"
if [ $# -ge 2 ]; then
  out="$2"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
max_new=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_new_tokens"])' \
  "$fx/expected.json")
status=0
for m in model tied_bf16; do
  for run in gpu1 gpu3 cpu; do
    case $run in
      gpu1) flags=(--device gpu --instances 1) ;;
      gpu3) flags=(--device gpu --instances 3 --rotate-compute) ;;
      cpu) flags=(--device cpu --instances 1) ;;
    esac
    if ! timeout 120 "$bin" generate --model "$fx/$m" --prompts "$fx/prompts.jsonl" \
      --max-new-tokens "$max_new" --segment-tokens 16 --arrival sequential "${flags[@]}" \
      --json "$out/$m.$run.json"; then
      echo "FAIL: $m $run: tokenlake generate ${flags[*]} failed"
      status=1
    fi
  done
done
[ "$status" -eq 0 ] || exit 1

python3 - "$fx" "$out" <<'PY'
import json, sys

fx, out = sys.argv[1], sys.argv[2]
expected = json.load(open(f"{fx}/expected.json"))
prompts = [json.loads(l)["input_ids"] for l in open(f"{fx}/prompts.jsonl") if l.strip()]
S = 16
REL, ABS = 0.02, 0.02  # gpu_test_util.h: kBf16RelTol, kBf16AbsTol
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL: " + msg)


def tolerance(ref):
    return REL * max(abs(x) for x in ref) + ABS


def top_margin(v):
    a, b = sorted(v, reverse=True)[:2]
    return a - b


def oracle_cached(prompt, histories):
    # fixture_test_util.h's ExpectedCachedTokens, independent of the engine and the lake.
    best = 0
    for h in histories:
        common = 0
        while common < len(prompt) and common < len(h) and prompt[common] == h[common]:
            common += 1
        usable = min(common, len(h) // S * S, len(prompt) - 1)
        best = max(best, usable // S * S)
    return best


for m in ("model", "tied_bf16"):
    exp = expected["models"][m]
    runs = {r: json.load(open(f"{out}/{m}.{r}.json")) for r in ("gpu1", "gpu3", "cpu")}
    hist = {}
    for r, js in runs.items():
        res = js["results"]
        if len(res) != len(prompts):
            fail(f"{m} {r}: {len(res)} results for {len(prompts)} prompts")
            continue
        if r.startswith("gpu"):
            if js.get("device") != "gpu" or not js.get("gpu_name") or js.get("kv_dtype") != "bf16":
                fail(f"{m} {r}: device {js.get('device')}, gpu_name {js.get('gpu_name')}, "
                     f"kv_dtype {js.get('kv_dtype')}")
            if "transport" in js or "lake" not in js:
                fail(f"{m} {r}: want a lake and no transport section, got {sorted(js)}")
        elif js.get("device") != "cpu":
            fail(f"{m} {r}: device {js.get('device')}")
        histories, worst = [], 0.0
        for i, (p, got) in enumerate(zip(prompts, res)):
            where = f"{m} {r} prompt {i} (line {got['line']})"
            last, dec = exp["last_logits"][i], exp["decode_logits"][i]
            greedy, min_margin = exp["greedy"][i], exp["min_margin"][i]
            tol_last, tol_dec = tolerance(last), tolerance(dec)
            err = max(abs(a - b) for a, b in zip(got["last_logits"], last))
            if len(got["last_logits"]) != len(last) or err > tol_last:
                fail(f"{where}: last_logits max|d| {err:.5f} > tolerance {tol_last:.4f}")
            worst = max(worst, err / tol_last)
            tol = max(tol_last, tol_dec)
            toks = got["greedy"]
            checked = equal = 0
            for k in range(len(greedy)):
                if toks[:k] != greedy[:k]:
                    break  # another sequence from here on
                sure = (min_margin > 2 * tol or (k == 0 and top_margin(last) > 2 * tol_last)
                        or (k == len(greedy) - 1 and top_margin(dec) > 2 * tol_dec))
                equal += toks[k] == greedy[k]
                if sure:
                    checked += 1
                    if toks[k] != greedy[k]:
                        fail(f"{where}: step {k} token {toks[k]}, transformers {greedy[k]} "
                             f"(margin > 2 x tolerance)")
            want = oracle_cached(p, histories)
            if got["cached_tokens"] != want:
                fail(f"{where}: cached_tokens {got['cached_tokens']}, oracle {want}")
            print(f"{where}: max|d| {err:.5f} (tol {tol_last:.4f}), tokens as transformers "
                  f"{equal}/{len(greedy)} ({checked} required), cached {got['cached_tokens']}, "
                  f"remote attends {got['remote_attend_calls']}, pulls {got['pulled_segments']}, "
                  f"stored {got['stored_segments']}")
            histories.append(p + toks[:-1])
        hist[r] = histories
        print(f"{m} {r}: worst error/tolerance {worst:.3f}, cached tokens {js['cached_tokens']} "
              f"of {js['prompt_tokens']}, {js['seconds']:.3f} s")
    if "gpu3" in hist:
        moved = sum(x["remote_attend_calls"] + x["pulled_segments"] for x in runs["gpu3"]["results"])
        if moved <= 0:
            fail(f"{m} gpu3: cached segments were never served by another instance")
    for a, b in (("gpu1", "gpu3"), ("gpu1", "cpu")):
        if a not in hist or b not in hist:
            continue
        compared = 0
        for i in range(len(prompts)):
            if hist[a][:i] != hist[b][:i]:
                break  # the pools differ from here on
            compared += 1
            ca = runs[a]["results"][i]["cached_tokens"]
            cb = runs[b]["results"][i]["cached_tokens"]
            if ca != cb:
                fail(f"{m} prompt {i}: cached_tokens {a} {ca} != {b} {cb}")
        print(f"{m}: cached_tokens {a} vs {b} compared on {compared}/{len(prompts)} prompts")

print(f"cli_gpu_test: {len(failures)} failures")
sys.exit(1 if failures else 0)
PY
