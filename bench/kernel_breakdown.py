#!/usr/bin/env python3
"""Per-kernel device time of the GPU engine's forwards, from an Nsight Compute CSV.

Reads the output of `ncu --metrics gpu__time_duration.sum --csv --page raw` over a run of
`tokenlake bench engine` (bench/kernel_breakdown.sh makes one), cuts the kernel sequence into
forwards at each forward's last kernel (the argmax of the logits), and prints, for the last
complete forwards with the most common kernel count, every kernel name's summed duration, count
and mean. Nsight Compute times each kernel alone (serialised, no overlap with its neighbours),
so a forward's sum exceeds its time in a run where kernels overlap (programmatic dependent
launch); compare kernels, not the sum with the step time.

    bench/kernel_breakdown.py NCU_CSV [--forwards N]
"""
import argparse
import collections
import csv
import gzip
import statistics
import sys


def read_kernels(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    try:
        header = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    except StopIteration:
        sys.exit(f"{path}: no 'Kernel Name' header (not an ncu --csv --page raw output?)")
    h = rows[header]
    name, dur, grid = h.index("Kernel Name"), h.index("gpu__time_duration.sum"), h.index("Grid Size")
    unit = rows[header + 1][dur]
    scale = {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit)
    if scale is None:
        sys.exit(f"{path}: unknown duration unit {unit!r}")
    kernels = []
    for r in rows[header + 2:]:
        if len(r) <= dur:
            continue
        value = r[dur].replace(",", "")
        try:
            us = float(value) * scale
        except ValueError:
            continue
        kernels.append((r[name].split("(")[0], r[grid], us))
    return kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--forwards", type=int, default=2, help="complete forwards to print")
    args = ap.parse_args()
    kernels = read_kernels(args.csv)
    forwards, current = [], []
    for k in kernels:
        current.append(k)
        if "ArgmaxKernel" in k[0]:
            forwards.append(current)
            current = []
    # The first one may have started before the capture.
    forwards = forwards[1:]
    print(f"{len(kernels)} kernels, {len(forwards)} complete forwards "
          f"({[len(f) for f in forwards]} kernels each)")
    if not forwards:
        sys.exit("no complete forward captured: widen --launch-count or change --launch-skip")
    modal = collections.Counter(len(f) for f in forwards).most_common(1)[0][0]
    chosen = [f for f in forwards if len(f) == modal][-args.forwards:]
    for f in chosen:
        by = collections.defaultdict(list)
        for name, grid, us in f:
            by[(name, grid)].append(us)
        print(f"\nforward of {len(f)} kernels, durations summed: {sum(k[2] for k in f):.1f} us")
        for (name, grid), v in sorted(by.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {sum(v):9.1f} us  x{len(v):4d}  {statistics.mean(v):8.2f} us each  "
                  f"grid {grid:14s} {name[:90]}")


if __name__ == "__main__":
    main()
