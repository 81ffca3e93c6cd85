#!/usr/bin/env bash
# Runs the official `openai` npm package (pinned below) with Node against `tokenlake serve` over a
# tiny random-init model with a byte-level BPE tokenizer fixture and its chat template.
#   run.sh TOKENLAKE_BINARY WORK_DIR
# The package is installed with npm into WORK_DIR (a build folder; npm's cache is kept there
# too), never into the source tree. Fails, saying why, when node or npm is missing or the
# package cannot be installed: this test is never skipped.
set -euo pipefail
OPENAI_VERSION=4.104.0
bin=$(realpath "$1")
work=$(mkdir -p "$2" && realpath "$2")
here=$(cd "$(dirname "$0")" && pwd)

for tool in node npm python3; do
  command -v "$tool" >/dev/null || { echo "openai client test: $tool not found (scripts/install-deps.sh installs it)"; exit 1; }
done
if [ ! -f "$work/node_modules/openai/package.json" ] ||
   ! grep -q "\"version\": \"$OPENAI_VERSION\"" "$work/node_modules/openai/package.json"; then
  echo "openai client test: npm install openai@$OPENAI_VERSION into $work"
  printf '{"name": "tokenlake-openai-client-test", "private": true, "type": "module"}\n' > "$work/package.json"
  if ! npm install --prefix "$work" --cache "$work/npm-cache" --no-audit --no-fund \
       --save-exact "openai@$OPENAI_VERSION" > "$work/npm-install.log" 2>&1; then
    echo "openai client test: npm could not install openai@$OPENAI_VERSION (log: $work/npm-install.log):"
    tail -20 "$work/npm-install.log"
    exit 1
  fi
fi
cp "$here/client_test.mjs" "$work/client_test.mjs"
rm -rf "$work/model"
python3 "$here/make_model.py" --tokenizer "$here/../fixtures/tokenizer/bpe_gpt2" --out "$work/model"

port_file="$work/port"
rm -f "$port_file"
"$bin" serve --instances 2 --model "$work/model" --port 0 --port-file "$port_file" \
  --log-dir "$work" > "$work/serve.out" 2> "$work/serve.err" &
serve=$!
trap 'kill "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  [ -s "$port_file" ] && break
  kill -0 "$serve" 2>/dev/null || { echo "openai client test: tokenlake serve exited"; cat "$work/serve.err"; exit 1; }
  sleep 0.1
done
[ -s "$port_file" ] || { echo "openai client test: tokenlake serve did not start"; cat "$work/serve.err"; exit 1; }
port=$(cat "$port_file")
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" > /dev/null 2>&1 && break
  sleep 0.1
done
(cd "$work" && node client_test.mjs "$port")
