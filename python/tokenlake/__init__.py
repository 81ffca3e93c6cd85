"""TokenLake from Python: the cluster-wide prefix cache pool's control plane, and the simulator.

The control plane (a ``Lake``) is the one the engines and the cluster run (C++, through the
``_tokenlake`` extension), on plain Python types:

    import tokenlake
    lake = tokenlake.Lake(instances=4, segment_tokens=16, slots_per_instance=256,
                          model=dict(layers=32, heads=32, kv_heads=8, head_dim=128))
    req = dict(id=1, tokens=prompt_ids, new_tokens=len(prompt_ids))
    print(lake.match(prompt_ids))          # {'matched_segments', 'matched_tokens', ...}
    plan, = lake.gen_plans([dict(requests=[req], dop=1)])
    lake.admit(req)                        # pins the cached prefix
    ...                                    # your data plane runs plan['requests'][0]
    lake.commit(1, plan['new_segments'])   # the new segments become visible
    lake.release(1)

A request is a dict: ``id`` (int), ``tokens`` (a list or 1-D numpy array of token ids; or
``keys``, a list of ``(segment_id, num_tokens)`` from ``segment_keys``), ``new_tokens`` (the
tokens this iteration computes), optional ``preferred_instance`` and ``extra_slots``. Plans and
results are dicts and lists (instance -1 means none). Errors raise ValueError (bad input),
KeyError (an unknown request) or RuntimeError.

Methods: ``segment_keys(tokens)``, ``match(tokens)``, ``cache_load(requests)`` (per instance:
the requests' attention work over the cache it holds), ``cache_load_share(requests,
kv_bytes_per_s, attention_flops_per_s, batch_seconds)`` (the paper's get_cache_load roofline L:
the share of an iteration of that length that reading the cache adds),
``gen_plans(batches)`` (a batch: ``dict(requests=[...], dop=1, candidates=[...])``),
``admit(request)``, ``try_admit(request)`` (None when the pool cannot hold its new segments),
``commit(request_id, placements)``, ``release(request_id)``, ``rebalance()``, ``stats()``,
``advance(seconds)`` (with ``clock='manual'``), ``check_integrity()``.

The simulator: ``tokenlake.sim.run(workload="chat", requests=200, instances=4, seed=1)`` takes
``tokenlake sim``'s options as keyword arguments and returns the dict that
``tokenlake sim --json`` writes (the same code runs, in this process).
"""
from tokenlake._tokenlake import Lake, namespace_salt, segment_keys
from tokenlake import sim

__all__ = ["Lake", "namespace_salt", "segment_keys", "sim"]
