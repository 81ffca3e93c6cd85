#!/usr/bin/env python3
"""A toy scheduler in Python that routes requests with TokenLake's plans.

It serves a stream of chat-like requests (a few shared system prompts, each followed by a
user's own turns) over a pool of N instances: every request is planned by the lake
(``gen_plans``), admitted (its cached prefix pinned), "computed" on the instance the plan names,
and committed (its new segments stored where the plan places them), then released. It prints
where requests ran, the pool's hit rate, and how many cached segments were served from another
instance than the computing one (the queries moved to the cache, TokenLake's point).

    PYTHONPATH=build/release/python python3 examples/python_scheduler.py --requests 200
"""
import argparse
import collections
import random

import tokenlake


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--segment-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=256, help="segment slots per instance")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lake = tokenlake.Lake(instances=args.instances, segment_tokens=args.segment_tokens,
                          slots_per_instance=args.slots,
                          model=dict(layers=32, heads=32, kv_heads=8, head_dim=128))
    system_prompts = [[rng.randrange(32000) for _ in range(rng.randint(200, 600))]
                      for _ in range(3)]
    histories = []  # conversations: each a token list that grows turn by turn
    ran_on = collections.Counter()
    remote_segments = local_segments = 0
    for rid in range(1, args.requests + 1):
        if histories and rng.random() < 0.6:
            conv = rng.randrange(len(histories))  # a follow-up turn
        else:
            histories.append(list(rng.choice(system_prompts)))
            conv = len(histories) - 1
        turn = [rng.randrange(32000) for _ in range(rng.randint(10, 80))]
        prompt = histories[conv] + turn
        request = dict(id=rid, tokens=prompt, new_tokens=len(prompt) - lake.match(prompt)["matched_tokens"])
        (plan,) = lake.gen_plans([dict(requests=[request], dop=1)])
        if lake.try_admit(request) is None:
            print(f"request {rid}: the pool cannot hold it now; a real scheduler would queue it")
            continue
        rp = plan["requests"][0]
        ran_on[rp["compute_instance"]] += 1
        for seg in rp["segments"]:
            if seg["holder"] == rp["compute_instance"]:
                local_segments += 1
            else:
                remote_segments += 1
        # ... the data plane computes the new tokens here, attending over the plan's holders ...
        lake.commit(rid, plan["new_segments"])
        lake.release(rid)
        answer = [rng.randrange(32000) for _ in range(rng.randint(10, 60))]
        histories[conv] = prompt + answer
        if rid % 50 == 0:
            lake.rebalance()
    st = lake.stats()
    print("requests per computing instance:", dict(sorted(ran_on.items())))
    print(f"pool hit rate {st['hit_rate']:.3f}, segments {st['segments']}, "
          f"replicas {st['replicas']}, evicted {st['evicted_replicas']}")
    print(f"cached segments served locally {local_segments}, from another instance "
          f"{remote_segments}")


if __name__ == "__main__":
    main()
