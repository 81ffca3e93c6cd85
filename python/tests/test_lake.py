"""The Python control plane against a naive model of prefix caching (random, seed printed)."""
import random

import numpy as np
import pytest

import tokenlake

MODEL = dict(layers=2, heads=4, kv_heads=2, head_dim=8, dtype_bytes=2)


def test_segment_keys_chain_and_share_prefixes():
    a = list(range(40))
    b = list(range(32)) + [999] * 8
    ka = tokenlake.segment_keys(a, segment_tokens=16)
    kb = tokenlake.segment_keys(np.array(b, dtype=np.int32), segment_tokens=16)
    assert [n for _, n in ka] == [16, 16, 8]
    # The same first 32 tokens give the same ids; the different tail a different id.
    assert ka[:2] == kb[:2]
    assert ka[2] != kb[2]
    # Another namespace gives other ids for the same tokens.
    assert tokenlake.segment_keys(a, segment_tokens=16, namespace="other")[0] != ka[0]
    # Ids of a prefix do not depend on what follows it.
    assert tokenlake.segment_keys(a[:16], segment_tokens=16)[0] == ka[0]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="segment_tokens"):
        tokenlake.Lake(instances=2, segment_tokens=0, model=MODEL)
    with pytest.raises(ValueError, match="unknown field 'layer'"):
        tokenlake.Lake(model=dict(layer=2))
    lake = tokenlake.Lake(instances=2, segment_tokens=4, slots_per_instance=8, model=MODEL)
    with pytest.raises(ValueError, match="not a token id"):
        lake.match([1, -2, 3])
    with pytest.raises(TypeError):
        lake.match([[1, 2], [3, 4]])
    with pytest.raises(KeyError):
        lake.release(12345)
    with pytest.raises(KeyError, match="'tokens' or 'keys'"):
        lake.admit(dict(id=1, new_tokens=3))
    with pytest.raises(ValueError, match="clock='manual'"):
        lake.advance(1.0)


def serve(lake, rid, tokens, seg):
    """One request's prefill through the lake, as an engine does it; returns its hit."""
    req = dict(id=rid, tokens=tokens, new_tokens=len(tokens))
    (plan,) = lake.gen_plans([dict(requests=[req], dop=1)])
    admitted = lake.admit(req)
    rp = plan["requests"][0]
    assert rp["cached_tokens"] == admitted["matched_tokens"]
    assert sum(s["num_tokens"] for s in rp["segments"]) == rp["cached_tokens"]
    lake.commit(rid, plan["new_segments"])
    lake.release(rid)
    return admitted["matched_tokens"]


def test_hits_equal_a_naive_prefix_cache_without_eviction():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    seg = rng.choice([2, 4, 16])
    lake = tokenlake.Lake(instances=rng.randint(1, 4), segment_tokens=seg,
                          slots_per_instance=4096, model=MODEL, clock="manual")
    docs = [[rng.randrange(1000) for _ in range(rng.randint(5, 60))] for _ in range(4)]
    stored = set()  # naive model: every full-or-part segment prefix ever computed
    for rid in range(1, 60):
        doc = rng.choice(docs)
        tokens = doc[: rng.randint(1, len(doc))] + [rng.randrange(1000) for _ in range(rng.randint(0, 9))]
        keys = tokenlake.segment_keys(tokens, segment_tokens=seg)
        want = 0
        for k, n in keys:
            if k not in stored:
                break
            want += n
        assert lake.match(tokens)["matched_tokens"] == want
        assert serve(lake, rid, tokens, seg) == want
        stored.update(k for k, _ in keys)
        lake.advance(0.01)
    lake.check_integrity()
    st = lake.stats()
    assert st["active_requests"] == 0 and st["pinned_segments"] == 0
    assert st["segments"] == len(stored)
    assert 0 < st["hit_rate"] < 1


def test_small_pool_evicts_and_try_admit_waits():
    lake = tokenlake.Lake(instances=1, segment_tokens=4, slots_per_instance=3, model=MODEL)
    a = dict(id=1, tokens=list(range(12)), new_tokens=12)  # 3 segments: the whole pool
    assert lake.try_admit(a) is not None
    b = dict(id=2, tokens=list(range(100, 108)), new_tokens=8)
    assert lake.try_admit(b) is None  # a's reservation holds every slot
    (plan,) = lake.gen_plans([dict(requests=[a])])
    lake.commit(1, plan["new_segments"])
    lake.release(1)
    assert lake.try_admit(b) is not None  # a's segments are unpinned now: evictable
    (plan,) = lake.gen_plans([dict(requests=[b])])
    res = lake.commit(2, plan["new_segments"])
    assert len(res["stored"]) == 2 and len(res["evicted"]) == 2
    lake.release(2)
    lake.check_integrity()


def test_plans_spread_over_instances_and_cache_load_reports_them():
    lake = tokenlake.Lake(instances=4, segment_tokens=4, slots_per_instance=64, model=MODEL)
    doc = list(range(64))
    serve(lake, 1, doc, 4)
    q = dict(id=2, tokens=doc + [7, 7, 7], new_tokens=3)
    loads = lake.cache_load([q])
    assert len(loads) == 4
    assert sum(l["cached_tokens"] for l in loads) == pytest.approx(64)
    plans = lake.gen_plans([dict(requests=[q], dop=2)])
    assert plans[0]["dop"] == 2 and len(plans[0]["instance_group"]) == 2
    assert plans[0]["requests"][0]["cached_tokens"] == 64
    assert lake.rebalance()["sequence"] > 0


def test_cache_load_share_is_the_roofline():
    # One instance, one request with 64 cached tokens and 4 new ones; 2 layers, 4 query heads and
    # 2 KV heads of 8 dims, 2-byte KV. M = K and V of prefix + input tokens = 2 layers x 2 x 68
    # tokens x 2 heads x 8 dims x 2 bytes = 8,704 bytes; F = the 4 new queries over the 64
    # cached keys, both products (2 FLOPs each) = 2 layers x 4 x 4 x 64 x 4 heads x 8 dims =
    # 65,536 FLOPs. With B = 8,704 bytes/s, P = 65,536 FLOP/s, T = 1 s and N = 1:
    # L = max(M / (M + B T), F / (F + P T)) = 0.5; with B doubled the memory term is 1/3.
    lake = tokenlake.Lake(instances=1, segment_tokens=4, slots_per_instance=64, model=MODEL)
    doc = list(range(64))
    serve(lake, 1, doc, 4)
    req = dict(id=2, tokens=doc + [5, 6, 7, 8], new_tokens=4)
    share = lake.cache_load_share([req], kv_bytes_per_s=8704, attention_flops_per_s=65536,
                                  batch_seconds=1.0)
    assert share == pytest.approx(0.5, rel=1e-6)
    share = lake.cache_load_share([req], kv_bytes_per_s=2 * 8704, attention_flops_per_s=4 * 65536,
                                  batch_seconds=1.0)
    assert share == pytest.approx(1 / 3, rel=1e-6)
    with pytest.raises(ValueError):
        lake.cache_load_share([req], kv_bytes_per_s=0, attention_flops_per_s=1, batch_seconds=1)
