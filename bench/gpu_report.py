#!/usr/bin/env python3
"""Compares gpu_attention_bench.json (ours) with sdpa.json (PyTorch SDPA, same run).

Usage: gpu_report.py OURS.json SDPA.json [MERGE.json]. Prints the figures docs/results-gpu.md
records; MERGE.json (gpu_merge_bench's output, same run) adds the decode calls replayed in
one CUDA graph.
"""
import json
import sys


def main():
    ours = json.load(open(sys.argv[1]))
    sdpa = json.load(open(sys.argv[2]))
    merge = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    copy = ours["copy_gbps"]
    runs = ours["runs"]
    print(f"device: {ours['device']} ({ours['num_sms']} SMs); torch {sdpa['torch']}")
    print(f"D2D copy: {copy:.0f} GB/s (cudaMemcpy, ours); {sdpa['copy_gbps']:.0f} GB/s (torch)")
    for mb in (128, 1024):
        if f"read_{mb}mib_x1_gbps" in ours:
            r1, r10 = ours[f"read_{mb}mib_x1_gbps"], ours[f"read_{mb}mib_x10_gbps"]
            print(f"read-only stream over {mb} MiB: {r1:.0f} GB/s one launch per sample "
                  f"({100 * r1 / copy:.1f}% of copy), {r10:.0f} GB/s 10 back to back "
                  f"({100 * r10 / copy:.1f}%)")

    def best(name, key, **filt):
        c = [r for r in runs if r["name"] == name and all(r[k] == v for k, v in filt.items())]
        return min(c, key=lambda r: r["us"]) if c else None

    def auto(name, **filt):
        # Library defaults: automatic splits, decode unroll 4 (or unset), prefill warps as given.
        c = [r for r in runs if r["name"] == name and r["num_splits"] == 0 and
             r.get("decode_unroll", 0) in (0, 4) and
             r.get("decode_pipeline", 0) in (0, 2) and all(r[k] == v for k, v in filt.items())]
        return c[0] if c else None

    print("\nDecode, 1 token over a 32K-token pooled prefix (GQA 32/8, d=128, bf16):")
    for seg in sorted({r["segment_tokens"] for r in runs if r["name"] == "decode"}, reverse=True):
        a, b = auto("decode", segment_tokens=seg), best("decode", "us", segment_tokens=seg)
        print(f"  segment {seg:4d}: auto {a['us']:7.1f} us {a['kv_gbps']:6.0f} GB/s = "
              f"{100 * a['kv_gbps'] / copy:5.1f}% of copy; best (splits {b['num_splits']}, unroll "
              f"{b.get('decode_unroll', 0)}, pipeline {b.get('decode_pipeline', 0)}) "
              f"{b['us']:7.1f} us {b['kv_gbps']:6.0f} GB/s = {100 * b['kv_gbps'] / copy:5.1f}%; "
              f"merge of two partials {a['merge_us']:.1f} us = "
              f"{100 * a['merge_us'] / a['us']:.1f}% of decode")
        v = min([r for r in runs if r["name"].startswith("decode") and
                 r["segment_tokens"] == seg], key=lambda r: r["us"])
        print(f"                best of all decode variants: {v['name']} (splits "
              f"{v['num_splits']}) {v['us']:7.1f} us {v['kv_gbps']:6.0f} GB/s = "
              f"{100 * v['kv_gbps'] / copy:5.1f}% of copy")
        if "batched_us" in a:
            r1 = ours.get("read_128mib_x1_gbps")
            r10 = ours.get("read_128mib_x10_gbps")
            print(f"                10 calls back to back: {a['batched_us']:7.1f} us per call "
                  f"{a['batched_kv_gbps']:6.0f} GB/s = {100 * a['batched_kv_gbps'] / copy:5.1f}% "
                  f"of copy" + (f"; vs the 128 MiB read-only stream: "
                                f"{100 * a['kv_gbps'] / r1:.1f}% (one call), "
                                f"{100 * a['batched_kv_gbps'] / r10:.1f}% (back to back)"
                                if r1 and r10 else ""))
        for pdl in (1, 2):
            r = auto(f"decode_pdl{pdl}", segment_tokens=seg)
            if r:
                print(f"                10 back to back, PDL {pdl}: {r['batched_us']:7.1f} us per call "
                      f"{r['batched_kv_gbps']:6.0f} GB/s = "
                      f"{100 * r['batched_kv_gbps'] / copy:5.1f}% of copy (one call "
                      f"{r['us']:.1f} us)")
        for name, what in (("decode_cc", "CUDA-core kernels"),
                           ("decode_cc_regs", "CUDA-core kernels, K/V through registers"),
                           ("decode_cc_u2", "CUDA-core kernels, 2 tokens per group and step")):
            r = best(name, "us", segment_tokens=seg, num_splits=0)
            if r:
                print(f"                {what}: {r['us']:7.1f} us {r['kv_gbps']:6.0f} GB/s = "
                      f"{100 * r['kv_gbps'] / copy:5.1f}% of copy; back to back "
                      f"{r['batched_us']:7.1f} us {r['batched_kv_gbps']:6.0f} GB/s = "
                      f"{100 * r['batched_kv_gbps'] / copy:5.1f}%")
        sep = auto("decode_sep_merge", segment_tokens=seg)
        if sep:
            print(f"                separate split-merge kernel {sep['us']:7.1f} us; fused saves "
                  f"{sep['us'] - a['us']:.1f} us = {100 * (sep['us'] - a['us']) / sep['us']:.1f}% "
                  f"of the separate-merge call")
    sd = sdpa["decode"]
    if sd.get("best"):
        print(f"  SDPA ({sd['best']}): {sd['best_us']:7.1f} us {sd['kv_gbps']:6.0f} GB/s = "
              f"{100 * sd['kv_gbps'] / copy:5.1f}% of copy")
    if merge and "decode_layers" in merge:
        mc = merge.get("copy_gbps", copy)
        print(f"  10 calls (layers) in one CUDA graph, 512-token segments, per call (copy "
              f"{mc:.0f} GB/s in that run):")
        for r in merge["decode_layers"]:
            print(f"                ours, PDL {r['pdl']}: {r['per_call_us']:7.2f} us = "
                  f"{r['copy_pct']:5.1f}% of copy")
    if sd.get("graph10_us"):
        print(f"                SDPA ({sd['best']}): {sd['graph10_us']:7.2f} us = "
              f"{100 * sd['graph10_kv_gbps'] / copy:5.1f}% of copy")

    print("\nPrefill, 1024 new tokens over 32K cached (not causal), segments of 512:")
    sp = sdpa["prefill_cached"]
    for name, w in [(n, w) for n in ("prefill_cached", "prefill_cached_r32") for w in (4, 8)]:
        a = auto(name, prefill_warps=w)
        b = best(name, "us", prefill_warps=w)
        if not a:
            continue
        print(f"  {name} {w} warps: auto {a['us']:8.1f} us {a['tflops']:6.1f} TFLOP/s; best (splits "
              f"{b['num_splits']}) {b['us']:8.1f} us {b['tflops']:6.1f} TFLOP/s"
              + (f" = {100 * b['tflops'] / sp['tflops']:.1f}% of SDPA" if sp.get("best") else ""))
    short = [r for r in runs if r["name"].startswith("prefill_q256")]
    if short:
        print("  256 new tokens over 32K cached (the mma.sync kernel's default there: 16 rows, "
              "4 warps):")
        for r in short:
            print(f"    {r['prefill_rows_per_warp']} rows x {r['prefill_warps']} warps: "
                  f"{r['us']:8.1f} us {r['tflops']:6.1f} TFLOP/s")
    h, hb = auto("prefill_cached_sm90"), best("prefill_cached_sm90", "us")
    if h:
        print(f"  prefill_cached_sm90 (wgmma; the default on Hopper): auto {h['us']:8.1f} us "
              f"{h['tflops']:6.1f} TFLOP/s"
              + (f" = {100 * h['tflops'] / sp['tflops']:.1f}% of SDPA" if sp.get("best") else "")
              + f"; best (splits {hb['num_splits']}) {hb['us']:8.1f} us {hb['tflops']:6.1f} TFLOP/s")
    b = min([r for r in runs if r["name"].startswith("prefill_cached")], key=lambda r: r["us"])
    if sp.get("best"):
        print(f"  SDPA ({sp['best']}): {sp['best_us']:8.1f} us {sp['tflops']:6.1f} TFLOP/s;"
              f" ours best = {100 * b['tflops'] / sp['tflops']:.1f}% of SDPA")
    print(f"  merge of two [1024 x 32 x 128] partials: {b['merge_us']:.1f} us = "
          f"{100 * b['merge_us'] / b['us']:.2f}% of the prefill partial")
    n = min([r for r in runs if r["name"].startswith("prefill_new_causal")],
            key=lambda r: r["us"], default=None)
    sn = sdpa["prefill_new_causal"]
    for r in [r for r in runs if r["name"].startswith("prefill_new_causal")]:
        print(f"\n  {r['name']}: {r['us']:.1f} us {r['tflops']:.1f} TFLOP/s", end="")
    if n:
        print(f"\nNew tokens' own KV, 1024 x 1024 causal: {n['us']:.1f} us {n['tflops']:.1f} TFLOP/s"
              + (f"; SDPA ({sn['best']}) {sn['best_us']:.1f} us {sn['tflops']:.1f} TFLOP/s"
                 if sn.get("best") else ""))
        total = b["us"] + n["us"] + b["merge_us"]
        print(f"Whole prefill step (cached + new + merge): {total:.1f} us; merge = "
              f"{100 * b['merge_us'] / total:.2f}%")


if __name__ == "__main__":
    main()
