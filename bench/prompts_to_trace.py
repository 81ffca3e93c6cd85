#!/usr/bin/env python3
"""The prompts of `tokenlake bench engine --prompts FILE` as a Mooncake JSON-lines trace.

For `tokenlake sim --trace`: one line per request of the named workload, all arriving at
timestamp 0 (as the benchmark submits them), with its prompt length, its max_new_tokens, and one
chained id per 512-token block (equal ids exactly when the block and everything before it are
equal), so that the simulator sees the same prefix sharing as the engine's pool.

  python3 bench/prompts_to_trace.py --prompts prompts.json --workload shared-prefix-64 \
      --out trace.jsonl
"""
import argparse
import json
import sys

BLOCK = 512  # the simulator's block (src/tokenlake/sim/workload.h: kBlockTokens)


def chained_ids(prompt, table):
    ids, prev = [], -1
    for start in range(0, len(prompt), BLOCK):
        key = (prev, tuple(prompt[start:start + BLOCK]))
        prev = table.setdefault(key, len(table))
        ids.append(prev)
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, help="JSON written by tokenlake bench engine")
    ap.add_argument("--workload", required=True, help="name of one of its workloads")
    ap.add_argument("--out", required=True, help="trace file to write (JSON lines)")
    args = ap.parse_args()
    with open(args.prompts) as f:
        spec = json.load(f)
    found = [w for w in spec.get("workloads", []) if w.get("name") == args.workload]
    if not found:
        names = ", ".join(w.get("name", "?") for w in spec.get("workloads", []))
        sys.exit(f"prompts_to_trace: {args.prompts} has no workload '{args.workload}' "
                 f"(it has: {names or 'none'})")
    w = found[0]
    table = {}
    with open(args.out, "w") as out:
        for i, p in enumerate(w["prompts"]):
            if not p or not all(isinstance(t, int) for t in p):
                sys.exit(f"prompts_to_trace: prompt {i} of '{args.workload}' is not a non-empty "
                         "list of token ids")
            out.write(json.dumps({"timestamp": 0, "input_length": len(p),
                                  "output_length": int(w["max_new_tokens"]),
                                  "hash_ids": chained_ids(p, table)}) + "\n")
    print(f"wrote {len(w['prompts'])} requests, {len(table)} distinct blocks to {args.out}")


if __name__ == "__main__":
    main()
