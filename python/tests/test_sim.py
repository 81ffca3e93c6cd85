"""tokenlake.sim.run: the CLI's simulator in-process, with the CLI's own JSON."""
import json
import os
import subprocess
import tempfile

import pytest

import tokenlake

OPTIONS = dict(workload="chat", requests=150, instances=4, seed=3,
               policies="round-robin,cache-aware,tokenlake", pd_splits="2P:2D")


def test_run_returns_the_policies_results():
    r = tokenlake.sim.run(**OPTIONS)
    assert r["config"]["instances"] == 4 and r["config"]["requests"] == 150
    names = [p["policy"] for p in r["results"]]
    assert names == ["round-robin", "cache-aware", "tokenlake"]
    for p in r["results"]:
        assert 0 <= p["hit_rate"] <= 1


@pytest.mark.skipif("TOKENLAKE_CLI" not in os.environ, reason="needs the CLI binary (ctest sets it)")
def test_run_equals_the_cli_json():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sim.json")
        args = []
        for k, v in OPTIONS.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        subprocess.run([os.environ["TOKENLAKE_CLI"], "sim", *args, "--json", out], check=True,
                       capture_output=True)
        with open(out) as f:
            want = json.load(f)
    assert tokenlake.sim.run(**OPTIONS) == want


def test_flags_lists_and_errors():
    r = tokenlake.sim.run(workload="chat", requests=60, instances=2, policies=["tokenlake"],
                          max_rate=False, rate=None)
    assert [p["policy"] for p in r["results"]] == ["tokenlake"]
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        tokenlake.sim.run(workload="nope")
    with pytest.raises(ValueError, match="no-such-flag"):
        tokenlake.sim.run(no_such_flag=1)
    with pytest.raises(ValueError, match="json="):
        tokenlake.sim.run(json="x.json")
