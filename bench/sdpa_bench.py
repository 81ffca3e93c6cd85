#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of gpu_attention_bench.cc (same session).

GQA 32 query / 8 KV heads, head_dim 128, bf16, contiguous K/V ([B, H, L, D]). Each backend
(flash, cuDNN, memory-efficient) is tried with enable_gqa=True and with K/V expanded to 32 heads;
the fastest that runs is SDPA's figure. Timings: CUDA events, median of 50 after 5 warm-ups,
two input sets alternated. Writes JSON to argv[1].
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


def rand(*shape):
    return (torch.rand(*shape, device=dev, dtype=torch.float32) * 2 - 1).to(torch.bfloat16)


def bench(q_len, kv_len, causal):
    sets = []
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
           "decode": bench(1, 32768, False),
           "prefill_cached": bench(1024, 32768, False),
           "prefill_new_causal": bench(1024, 1024, True)}
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
