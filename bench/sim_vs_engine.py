#!/usr/bin/env python3
"""The simulator's completion times beside the GPU engine's measured ones (issue 12, item 6).

Reads `tokenlake bench engine --json` output (its "workloads": seconds and pool hit rate per
workload) and, per workload W, the `tokenlake sim --json` output SIM_DIR/sim_W.json (the
simulation of the same prompts as a trace, bench/prompts_to_trace.py, on one instance), and
prints per workload the engine's seconds, the simulator's completion time (makespan_s of its
tokenlake row), their ratio, both hit rates, and whether the ratio is within the tolerance.
Exit status: 0 when every workload is within it, 1 when one is not, 2 for missing or bad input.

  python3 bench/sim_vs_engine.py --bench bench_engine_llama3-8b.json --sim-dir OUT \
      [--prefix sim_] [--tolerance 0.15]
"""
import argparse
import json
import os
import sys


def load(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"sim_vs_engine: cannot read {what} '{path}': {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="tokenlake bench engine --json output")
    ap.add_argument("--sim-dir", required=True, help="folder of the sim JSONs")
    ap.add_argument("--prefix", default="sim_", help="sim JSON file names: PREFIX + workload")
    ap.add_argument("--policy", default="tokenlake", help="the sim row to compare")
    ap.add_argument("--tolerance", type=float, default=0.15,
                    help="largest accepted |sim / engine - 1| (default 0.15)")
    args = ap.parse_args()
    bench = load(args.bench, "the engine bench JSON")
    workloads = bench.get("workloads")
    if not isinstance(workloads, list) or not workloads:
        print(f"sim_vs_engine: '{args.bench}' has no workloads", file=sys.stderr)
        return 2
    print(f"engine: {bench.get('device', {}).get('name', '?')}, commit {bench.get('commit', '?')}, "
          f"model {bench.get('model', {}).get('name', '?')}")
    print(f"{'workload':<18} {'engine_s':>9} {'sim_s':>9} {'sim/eng':>8} {'hit_eng':>8} "
          f"{'hit_sim':>8}  iteration table  verdict")
    outside = 0
    for w in workloads:
        name = w.get("name", "?")
        path = os.path.join(args.sim_dir, f"{args.prefix}{name}.json")
        if not os.path.exists(path):
            print(f"sim_vs_engine: no simulation of '{name}' ({path})", file=sys.stderr)
            return 2
        sim = load(path, "the sim JSON")
        rows = [r for r in sim.get("results", []) if r.get("policy") == args.policy]
        if not rows or rows[0].get("makespan_s") is None:
            print(f"sim_vs_engine: '{path}' has no {args.policy} row with makespan_s",
                  file=sys.stderr)
            return 2
        r = rows[0]
        engine_s, sim_s = float(w["seconds"]), float(r["makespan_s"])
        ratio = sim_s / engine_s
        ok = abs(ratio - 1) <= args.tolerance
        outside += 0 if ok else 1
        table = sim.get("config", {}).get("gpu_iteration_table", "dense_ms")
        print(f"{name:<18} {engine_s:9.3f} {sim_s:9.3f} {ratio:8.3f} "
              f"{float(w.get('pool_hit_rate', 0)):8.3f} {float(r.get('hit_rate', 0)):8.3f}  "
              f"{table:<15}  {'within' if ok else 'OUTSIDE'} {args.tolerance:.0%}")
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
