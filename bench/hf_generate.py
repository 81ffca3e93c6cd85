#!/usr/bin/env python3
"""Hugging Face transformers' batched greedy `generate` on the prompts of `tokenlake bench engine`.

The comparison row of the engine benchmark: the same random-init model shape (bf16, on the GPU),
the same prompts (written by `tokenlake bench engine --prompts FILE`), all of a workload's
requests in one left-padded batch, greedy, exactly max_new_tokens new tokens each, with
`cache_implementation="static"` (transformers' fastest cache; it may compile the decode step). A
workload whose static cache does not fit runs in the largest batches that do, one after another
(reported as `batch_size`); a batch whose activations then run out of device memory is halved
and the workload run again (the sizes tried are in `out_of_memory_at`). Each workload runs twice; the first run (warm-up, compilation) is
reported separately from the second (the figure).

  python3 bench/hf_generate.py --prompts prompts.json --json hf.json [--cache static|dynamic]
"""
import argparse
import json
import sys
import time

import torch
import transformers

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0, rms_norm_eps=1e-5),
}


def build_model(name):
    shape = SHAPES[name]
    config = transformers.LlamaConfig(max_position_embeddings=1 << 17, tie_word_embeddings=False,
                                      **shape)
    torch.manual_seed(1)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    return model, config


def kv_bytes(config, batch, tokens):
    head_dim = config.hidden_size // config.num_attention_heads
    return (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * batch *
            tokens)


def run_batches(model, prompts, max_new, batch_size, cache):
    pad = 0
    done = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        longest = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                 max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 cache_implementation=cache, pad_token_id=pad)
        done += out.shape[0]
    torch.cuda.synchronize()
    return time.perf_counter() - t0, done


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, help="JSON written by tokenlake bench engine")
    ap.add_argument("--json", required=True, help="output JSON")
    ap.add_argument("--cache", default="static", choices=["static", "dynamic"])
    ap.add_argument("--reserve-gib", type=float, default=12.0,
                    help="device memory left for activations when sizing the batch")
    args = ap.parse_args()
    with open(args.prompts) as f:
        spec = json.load(f)
    model, config = build_model(spec["model"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free, total = torch.cuda.mem_get_info()
    rows = []
    for w in spec["workloads"]:
        prompts, max_new = w["prompts"], w["max_new_tokens"]
        longest = max(len(p) for p in prompts) + max_new
        room = free - args.reserve_gib * (1 << 30)
        batch = len(prompts)
        while batch > 1 and kv_bytes(config, batch, longest) > room:
            batch = (batch + 1) // 2
        row = dict(name=w["name"], requests=len(prompts), cache=args.cache,
                   new_tokens=len(prompts) * max_new)
        while True:
            row["batch_size"] = batch
            try:
                row["warmup_seconds"], _ = run_batches(model, prompts, max_new, batch, args.cache)
                row["seconds"], _ = run_batches(model, prompts, max_new, batch, args.cache)
                row["new_tokens_per_s"] = len(prompts) * max_new / row["seconds"]
                break
            except torch.cuda.OutOfMemoryError as e:
                message = str(e).splitlines()[0]
            torch.cuda.empty_cache()  # outside the handler: the exception's frames are freed
            row.setdefault("out_of_memory_at", []).append(batch)
            if batch == 1:
                row["error"] = "out of memory: " + message
                break
            batch = (batch + 1) // 2
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    out = dict(model=spec["model"], transformers=transformers.__version__,
               torch=torch.__version__, device=torch.cuda.get_device_name(),
               weight_bytes=weights, workloads=rows)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
