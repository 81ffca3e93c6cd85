#!/usr/bin/env python3
"""The engine bench's workload served by N GPU instance processes sharing one GPU.

`tokenlake bench engine --json B --prompts P` runs its workloads (e.g. 64 requests of 2K-8K
tokens sharing documents, 128 new tokens each, all at once) on one in-process instance. This
script runs the same prompts through `tokenlake serve --device gpu --instances N
--load-format dummy` (random weights of the bench's shape, from B's model.config), every request
sent at once to the OpenAI API, and reports beside the in-process figures:
  - completion time, new tokens/s and the pool's hit rate;
  - the instances' cross-process data plane (from the coordinator's /metrics, deltas over the
    run): bytes of the peers' slots read in place after locate rounds, KV pulled, stored on a
    peer, moved as queries/partials and fetched through host staging (--peer-access host), and
    the messages and wall time of locate rounds, stores, tail slots and fetches, each in total
    and per layer (divided by the model's layers; a locate round
    serves every layer of an iteration at once).

  python3 bench/serve_workload.py --bin build/cuda/bin/tokenlake --bench OUT/bench_engine_M.json \
      --prompts OUT/prompts_M.json --instances 2 --json OUT/serve_workload_M.json

Runs on any machine with an NVIDIA GPU and a CUDA build of the CLI. Exits non-zero naming what
failed (the cluster's logs are left in --work-dir).
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request


def http_json(port, path, body=None, timeout=600):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^(\S+)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="a CUDA build's tokenlake")
    ap.add_argument("--bench", required=True, help="bench engine's JSON (its model.config)")
    ap.add_argument("--prompts", required=True, help="bench engine's --prompts file")
    ap.add_argument("--workload", help="which workload (default: the first)")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--memory-fraction", type=float, help="each instance's share (default 0.9/N)")
    ap.add_argument("--max-batch-tokens", type=int,
                    help="per instance (default: the bench's engine.max_batch_tokens)")
    ap.add_argument("--segment-tokens", type=int,
                    help="tokens per segment (default: the bench's engine.segment_tokens)")
    ap.add_argument("--peer-access", choices=["auto", "host"], default="auto",
                    help="serve's --peer-access: auto reads peers' slots in place (one GPU); host "
                         "fetches them through host staging, as between GPUs or hosts")
    ap.add_argument("--json", required=True, help="where the report goes")
    ap.add_argument("--work-dir", help="model folder and logs (default: a temporary folder)")
    args = ap.parse_args()
    if args.instances < 1:
        sys.exit("--instances must be >= 1")

    bench = json.load(open(args.bench))
    config = bench.get("model", {}).get("config")
    if not config:
        sys.exit(f"{args.bench}: no model.config (a bench engine JSON of this version names it)")
    layers = int(config["num_hidden_layers"])
    workloads = json.load(open(args.prompts))["workloads"]
    names = [w["name"] for w in workloads]
    w = next((w for w in workloads if args.workload in (None, w["name"])), None)
    if w is None:
        sys.exit(f"{args.prompts}: no workload {args.workload!r} (has {names})")
    in_process = next((r for r in bench.get("workloads", []) if r["name"] == w["name"]), None)

    # The bench runs prompts up to its own lengths whatever the shape's context; the served API
    # refuses a prompt plus its new tokens beyond max_position_embeddings, so the random-weights
    # model's context is raised to fit the workload (RoPE is computed at any position).
    need = max(len(p) for p in w["prompts"]) + int(w["max_new_tokens"])
    context_raised = need > int(config.get("max_position_embeddings", 0))
    if context_raised:
        config = dict(config, max_position_embeddings=need)

    work = args.work_dir or tempfile.mkdtemp(prefix="serve_workload_")
    model_dir = os.path.join(work, "model")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    fraction = args.memory_fraction or 0.9 / args.instances
    batch_tokens = args.max_batch_tokens or bench.get("engine", {}).get("max_batch_tokens", 2048)
    # The bench's segment size: the GPU kernels and the plans are the bench's only at its size
    # (serve's default, 16 tokens, is 16x the segments to locate, plan and attend).
    segment_tokens = args.segment_tokens or bench.get("engine", {}).get("segment_tokens", 16)
    port_file = os.path.join(work, "serve.port")
    if os.path.exists(port_file):
        os.unlink(port_file)
    serve_log = open(os.path.join(work, "serve.log"), "w")
    cmd = [args.bin, "serve", "--model", model_dir, "--device", "gpu", "--load-format", "dummy",
           "--instances", str(args.instances), "--memory-fraction", f"{fraction:.4f}",
           "--max-batch-tokens", str(batch_tokens), "--segment-tokens", str(segment_tokens),
           "--request-timeout-ms", "600000", "--peer-access", args.peer_access,
           "--log-dir", work, "--port-file", port_file]
    print("$ " + " ".join(cmd), flush=True)
    # Every request arrives at once: the last ones wait for the others' prefill, longer than
    # serve's default request deadline.
    serve = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=serve_log)
    try:
        deadline = time.time() + 600
        port = None
        while time.time() < deadline and serve.poll() is None:
            if os.path.exists(port_file) and open(port_file).read().strip():
                port = int(open(port_file).read())
                break
            time.sleep(0.5)
        if port is None:
            sys.exit(f"serve did not start (exit {serve.poll()}; logs in {work})")
        # Warm-up (cuBLAS, kernels) on tokens no workload prompt starts with.
        http_json(port, "/v1/completions", {"prompt": [1, 2, 3, 4, 5] * 60, "max_tokens": 4})
        before = metrics(port)
        prompts = w["prompts"]
        max_new = int(w["max_new_tokens"])

        def one(p):
            t = time.time()
            r = http_json(port, "/v1/completions",
                          {"prompt": p, "max_tokens": max_new, "temperature": 0})
            cached = r.get("usage", {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
            return time.time() - t, len(r["choices"][0].get("tokens", [])), cached

        print(f"workload {w['name']}: {len(prompts)} requests at once over {args.instances} "
              f"instance processes", flush=True)
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            results = list(pool.map(one, prompts))
        wall = time.time() - t0
        after = metrics(port)
        # The whole page beside the report, for what the summary leaves out (per instance).
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            open(os.path.join(work, "metrics_after.txt"), "wb").write(r.read())
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()

    def delta(series):
        return after.get(series, 0.0) - before.get(series, 0.0)

    prompt_tokens = sum(len(p) for p in prompts)
    new_tokens = sum(r[1] for r in results)
    if new_tokens != len(prompts) * max_new:
        sys.exit(f"{new_tokens} new tokens, want {len(prompts) * max_new} (logs in {work})")
    cached = sum(r[2] for r in results)
    kinds = {"kv_read_in_place": "read in place", "kv_pulled": "pulled",
             "kv_stored_remote": "stored on a peer", "query_out": "queries out",
             "partial_back": "partials back", "kv_fetched_host_staging": "fetched (host)"}
    bytes_ = {k: delta(f'tokenlake_data_plane_bytes_total{{kind="{k}"}}') for k in kinds}
    peer = {}
    for k in ("locate", "store", "tail", "fetch"):
        n = delta(f'tokenlake_data_plane_peer_messages_total{{kind="{k}"}}')
        s = delta(f'tokenlake_data_plane_peer_seconds_total{{kind="{k}"}}')
        peer[k] = {"messages": n, "seconds": s, "mean_ms": 1e3 * s / n if n else None,
                   "seconds_per_layer": s / layers}
    report = {
        "workload": w["name"], "instances": args.instances, "memory_fraction": fraction,
        "peer_access": args.peer_access,
        "max_batch_tokens": batch_tokens, "segment_tokens": segment_tokens, "requests": len(prompts),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "seconds": wall,
        "new_tokens_per_s": new_tokens / wall, "pool_hit_rate": cached / prompt_tokens,
        "request_seconds_median": sorted(r[0] for r in results)[len(results) // 2],
        "layers": layers, "context_raised_to": need if context_raised else None,
        "bytes": {k: {"total": v, "per_layer": v / layers} for k, v in bytes_.items()},
        "peer_messages": peer,
        "remote_attend_calls": delta("tokenlake_remote_attend_calls_total"),
        "routed_by_instance": {k: v - before.get(k, 0.0) for k, v in after.items()
                               if k.startswith("tokenlake_instance_routed_total")},
        "in_process": in_process,
        "device": bench.get("device"), "revision": bench.get("revision"),
    }
    if in_process:
        report["seconds_over_in_process"] = wall / in_process["seconds"]
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"workload {w['name']}: {args.instances} processes ({args.peer_access}) {wall:.2f} s "
          f"({new_tokens / wall:.0f} new tokens/s, hit rate {cached / prompt_tokens:.3f})"
          + (f"; one in-process instance {in_process['seconds']:.2f} s" if in_process else ""))
    for k, label in kinds.items():
        print(f"  {label:>16}: {bytes_[k] / 1e9:8.3f} GB, {bytes_[k] / layers / 1e6:9.2f} MB per layer")
    for k, v in peer.items():
        mean = f"{v['mean_ms']:.3f} ms each" if v["mean_ms"] is not None else "-"
        print(f"  {k:>8} messages: {v['messages']:8.0f}, {v['seconds']:7.3f} s ({mean}), "
              f"{1e3 * v['seconds_per_layer']:.3f} ms per layer")


if __name__ == "__main__":
    main()
