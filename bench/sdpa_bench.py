#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of gpu_attention_bench.cc (same run).

GQA 32 query / 8 KV heads, head_dim 128, bf16, contiguous K/V ([B, H, L, D]). Each backend
(flash, cuDNN, memory-efficient) is tried with enable_gqa=True and with K/V expanded to 32 heads;
the fastest that runs is SDPA's figure. Timings: CUDA events, median of 50 after 5 warm-ups,
two input sets alternated. Decode is also timed the way serving engines replay a decode step:
10 calls (one per layer, the sets alternated) captured in one CUDA graph, per call (the same
measure as gpu_merge_bench's "calls (layers) in one graph"). Writes JSON to argv[1].
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, HKV, D = 32, 8, 128
dev = "cuda"


def median_us(fn, reps=50, warmup=5):
    for i in range(warmup):
        fn(i)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends))
    return t[len(t) // 2]


def graph_us(fn, calls=10, reps=30):
    """Per-call time of fn(0..calls-1) captured in one CUDA graph: median of reps replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graph asks
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) * 1000.0 / calls for s, e in zip(starts, ends))
    return t[len(t) // 2]


def rand(*shape):
    return (torch.rand(*shape, device=dev, dtype=torch.float32) * 2 - 1).to(torch.bfloat16)


def bench(q_len, kv_len, causal, graph=False):
    sets = []
    runs = {}
    for _ in range(2):
        sets.append((rand(1, H, q_len, D), rand(1, HKV, kv_len, D), rand(1, HKV, kv_len, D)))
    results = {}
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        for gqa in (True, False):
            key = f"{name}{'_gqa' if gqa else '_expanded'}"
            try:
                if gqa:
                    inputs = sets
                else:
                    inputs = [(q, k.repeat_interleave(H // HKV, dim=1).contiguous(),
                               v.repeat_interleave(H // HKV, dim=1).contiguous())
                              for q, k, v in sets]

                def run(i, inputs=inputs, gqa=gqa):
                    q, k, v = inputs[i % 2]
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                          enable_gqa=gqa)
                with sdpa_kernel([be]):
                    us = median_us(run)
                results[key] = us
                runs[key] = (run, be)
            except Exception as e:  # a backend that does not support the shape
                results[key] = None
                print(f"  {key}: not available ({type(e).__name__}: {str(e)[:80]})")
    ok = {k: v for k, v in results.items() if v}
    best = min(ok, key=ok.get) if ok else None
    if causal:
        pairs = sum(min(i + 1, kv_len) for i in range(q_len))
    else:
        pairs = q_len * kv_len
    out = {"q": q_len, "kv": kv_len, "causal": causal, "us": results, "best": best}
    if best:
        us = ok[best]
        out["best_us"] = us
        out["tflops"] = 4.0 * pairs * H * D / (us * 1e6)
        out["kv_gbps"] = 2.0 * kv_len * HKV * D * 2 / (us * 1e3)
        if graph:
            run, be = runs[best]
            try:
                with sdpa_kernel([be]):
                    g_us = graph_us(run)
                out["graph10_us"] = g_us
                out["graph10_kv_gbps"] = 2.0 * kv_len * HKV * D * 2 / (g_us * 1e3)
                print(f"  {best}, 10 calls in one CUDA graph: {g_us:.1f} us per call")
            except Exception as e:  # capture not supported by this backend
                print(f"  {best} in a CUDA graph: not available ({type(e).__name__}: "
                      f"{str(e)[:80]})")
    print(f"SDPA q={q_len} kv={kv_len} causal={causal}: best {best} "
          f"{out.get('best_us', 0):.1f} us, {out.get('tflops', 0):.1f} TFLOP/s, "
          f"{out.get('kv_gbps', 0):.0f} KV GB/s; all {results}")
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "sdpa.json"
    torch.manual_seed(0)
    n = 1 << 29  # 1 GiB of bf16
    src = rand(n)
    dst = torch.empty_like(src)
    copy_us = median_us(lambda i: dst.copy_(src), reps=20, warmup=3)
    copy_gbps = 2 * src.numel() * 2 / (copy_us * 1e3)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; "
          f"copy {copy_gbps:.0f} GB/s (read+write)")
    del src, dst
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
           "copy_gbps": copy_gbps,
           "decode": bench(1, 32768, False, graph=True),
           "prefill_cached": bench(1024, 32768, False),
           "prefill_new_causal": bench(1024, 1024, True)}
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
