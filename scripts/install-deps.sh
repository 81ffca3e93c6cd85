#!/usr/bin/env bash
# Installs TokenLake's build and test dependencies from Debian's packages, when missing.
# Idempotent: does nothing (and needs no root) when everything is already installed.
set -euo pipefail

packages=(
  cmake ninja-build g++ make pkg-config git python3
  libgtest-dev libgmock-dev libbenchmark-dev
  libabsl-dev libcli11-dev nlohmann-json3-dev libxxhash-dev
  zlib1g-dev  # sim: gzip-compressed traces
  liblemon-dev  # plan: the dispatch's min-cost flow (docs/adr/0015-dispatch-by-min-cost-flow.md)
  libssl-dev openssl  # transport: the cluster secret's HMAC, TLS; openssl verifies in tests
  libpcre2-dev libicu-dev  # tokenizer: pre-tokenizer regexes, Unicode normalization
  # service: gRPC control plane, HTTP client (cpp-httplib is built with brotli support),
  # libFuzzer targets (clang 14)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libcpp-httplib-dev
  libbrotli-dev clang-14 libclang-rt-14-dev
  libmicrohttpd-dev  # service: the coordinator's HTTP server (docs/adr/0014-http-front-end-on-libmicrohttpd.md)
  clang-format-14 clang-tidy-14  # make check
  etcd-server  # service: membership and leader election (its tests run a real etcd)
  # the Python package: pybind11 extension, its tests, `pip install .` offline
  pybind11-dev python3-dev python3-pytest python3-numpy python3-pip python3-venv python3-setuptools
  curl  # the OpenAI client test waits for /healthz
)
# The OpenAI client test (tests/openai_client: the `openai` npm package, installed by npm into
# the build tree): Node and npm from Debian, unless node and npm are already on the PATH (a Node
# installed otherwise ships its own npm, which Debian's npm package would conflict with).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
