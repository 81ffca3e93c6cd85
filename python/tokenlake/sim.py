"""The simulator from Python: ``tokenlake sim`` in this process, its JSON as a dict.

    import tokenlake
    result = tokenlake.sim.run(workload="chat", requests=200, instances=4, seed=1)
    for p in result["policies"]:
        print(p["policy"], p["hit_rate"])

Keyword arguments are ``tokenlake sim``'s flags with ``_`` for ``-`` (``max_rate=True`` is
``--max-rate``; ``False`` or ``None`` leaves a flag out; a list or tuple gives one value per
item); ``tokenlake sim --help`` lists them. The result is the dict that ``tokenlake sim --json``
writes. Bad options raise ValueError with the CLI's message; with ``echo=True`` the CLI's report
is printed.
"""
import json
import os
import sys
import tempfile

from tokenlake import _tokenlake


def _args(options):
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args.append(flag)
            args.extend(str(v) for v in value)
        else:
            args.extend([flag, str(value)])
    return args


def run(*, echo=False, **options):
    """Runs ``tokenlake sim`` with ``options`` and returns its JSON result as a dict."""
    if "json" in options:
        raise ValueError("run() returns the JSON; do not pass json=")
    with tempfile.TemporaryDirectory(prefix="tokenlake-sim-") as tmp:
        out_json = os.path.join(tmp, "sim.json")
        stdout = os.path.join(tmp, "stdout.txt")
        stderr = os.path.join(tmp, "stderr.txt")
        code = _tokenlake._run_cli(["tokenlake", "sim", *_args(options), "--json", out_json],
                                   stdout, stderr)
        with open(stdout) as f:
            report = f.read()
        with open(stderr) as f:
            errors = f.read()
        if echo:
            sys.stdout.write(report)
        if code != 0:
            raise ValueError(f"tokenlake sim failed (exit {code}): {errors.strip()}")
        with open(out_json) as f:
            return json.load(f)
