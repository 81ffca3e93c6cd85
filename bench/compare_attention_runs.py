#!/usr/bin/env python3
"""Compares two gpu_attention_bench JSON files (for example one built at an older commit and one
at the current commit, run on the same GPU one after the other): for every run present in both
(same name, query tokens, KV tokens, segment size, requests and heads) the time ratio new / old,
per family of runs, and the runs that only one of them has.

  python3 bench/compare_attention_runs.py OLD.json NEW.json
"""
import json
import statistics
import sys


def runs(path):
    with open(path) as f:
        d = json.load(f)
    return d.get("device", "?"), {
        (r["name"], r["num_q_tokens"], r["kv_tokens"], r["segment_tokens"], r["num_requests"],
         r["num_heads"], r["num_kv_heads"]): r["us"] for r in d["runs"]}


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    dev_old, old = runs(sys.argv[1])
    dev_new, new = runs(sys.argv[2])
    if dev_old != dev_new:
        print(f"warning: different devices ({dev_old} / {dev_new})")
    common = [k for k in new if k in old]
    if not common:
        print("no run in common")
        return 1
    ratios = [new[k] / old[k] for k in common]
    print(f"{dev_new}: {len(common)} runs in common; new / old time: median "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    families = {}
    for k in common:
        families.setdefault(k[0], []).append(new[k] / old[k])
    for name, r in sorted(families.items()):
        print(f"  {name:28s} {len(r):3d} runs  median {statistics.median(r):.3f}  "
              f"range {min(r):.3f}-{max(r):.3f}")
    print("only in the old run:", ", ".join(sorted({k[0] for k in old if k not in new})) or "-")
    print("only in the new run:", ", ".join(sorted({k[0] for k in new if k not in old})) or "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
