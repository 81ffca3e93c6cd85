"""examples/python_scheduler.py runs and routes with the lake's plans."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_python_scheduler_example_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "python_scheduler.py"), "--requests", "80"],
        check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    assert "pool hit rate" in out
    hit = float(out.split("pool hit rate ")[1].split(",")[0])
    assert 0.3 < hit < 1.0  # follow-up turns and shared system prompts hit
    remote = int(out.rsplit("from another instance ", 1)[1].split()[0])
    assert remote > 0  # some cached segments live on another instance than the computing one
