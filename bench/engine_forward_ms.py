#!/usr/bin/env python3
"""A GPU profile with forward_ms taken from `tokenlake bench engine --json` measurements.

`tokenlake profile` measures forward_ms itself (the engine's forward pass with attention left
out, by batch tokens; src/tokenlake/sim/cost_model.h). For a profile measured without it, this
derives the same quantity from the engine bench of the same run:
  - decode rows: batch b -> the forward's device time by phase minus attention
    (phases_with_events: gemm_ms + other_ms + ends_ms), averaged over the contexts measured;
  - prefill rows of one chunk: n tokens -> the prefill's seconds minus the cost model's
    attention of n causal tokens (4 x n x (n + 1) / 2 x heads x head_dim x layers FLOPs at the
    profile's attn_prefill_tflops): the one point that uses the model, for attention only.
It writes the profile with forward_ms set and "forward_ms_source" saying where it came from.

  python3 bench/engine_forward_ms.py --bench bench_engine_llama3-8b.json \
      --profile profile.json --out profile_bench_forward.json
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="tokenlake bench engine --json output")
    ap.add_argument("--profile", required=True, help="tokenlake profile --json output")
    ap.add_argument("--out", required=True, help="profile to write")
    args = ap.parse_args()
    try:
        with open(args.bench) as f:
            bench = json.load(f)
        with open(args.profile) as f:
            profile = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"engine_forward_ms: {e}")
    m = bench.get("model", {})
    try:
        layers, heads, hidden = int(m["layers"]), int(m["heads"]), int(m["hidden"])
        prefill_tflops = float(profile["attn_prefill_tflops"])
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"engine_forward_ms: missing model shape or attn_prefill_tflops: {e}")
    head_dim = hidden // heads
    by_batch = {}
    for row in bench.get("decode", []):
        ph = row.get("phases_with_events")
        if not ph:
            continue  # skipped combinations
        by_batch.setdefault(int(row["batch"]), []).append(
            ph["gemm_ms"] + ph["other_ms"] + ph["ends_ms"])
    points = {b: sum(v) / len(v) for b, v in by_batch.items()}
    for row in bench.get("prefill", []):
        if int(row.get("chunks", 0)) != 1:
            continue  # a multi-chunk prefill's attention over earlier chunks is larger
        n = int(row["tokens"])
        attention_ms = 4.0 * n * (n + 1) / 2 * heads * head_dim * layers / (prefill_tflops * 1e12) * 1e3
        points[n] = float(row["seconds"]) * 1e3 - attention_ms
    if len(points) < 2:
        sys.exit(f"engine_forward_ms: '{args.bench}' has fewer than two usable measurements")
    profile["forward_ms"] = [[t, points[t]] for t in sorted(points)]
    profile["forward_ms_source"] = (
        f"derived from {args.bench} (commit {bench.get('commit', '?')}) by "
        "bench/engine_forward_ms.py: decode phases gemm + other + ends; one-chunk prefill seconds "
        "minus the cost model's causal attention")
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=2)
        f.write("\n")
    for t, ms in profile["forward_ms"]:
        print(f"forward_ms {t:>6}: {ms:8.3f}")


if __name__ == "__main__":
    main()
