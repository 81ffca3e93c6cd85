#!/usr/bin/env bash
# `pip install .` offline into a fresh virtual environment (Debian's setuptools, no index), then
# the package's tests run against the installed copy from another directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 -m venv --system-site-packages "$tmp/venv"
(cd "$tmp" && "$tmp/venv/bin/pip" install --no-index --no-cache-dir --quiet "$root")
cd "$tmp"
env -u PYTHONPATH "$tmp/venv/bin/python" -c "import tokenlake, sys; assert tokenlake.__file__.startswith('$tmp'), tokenlake.__file__"
env -u PYTHONPATH "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "$root/python/tests"
echo "pip_install_test: ok"
