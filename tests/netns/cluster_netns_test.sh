#!/usr/bin/env bash
# A TokenLake cluster across hosts, on one machine: network namespaces joined by veth pairs on a
# bridge (in a namespace of its own), addresses from the documentation range 198.51.100.0/24:
# one etcd host, two coordinator hosts, three instance hosts, one client host. It serves requests
# with mutual TLS and API keys, kills the leader coordinator, then cuts one instance host off and
# heals it, while the coordinators' fault-injecting transport adds loss and delay; every answer
# must equal the single-process reference, no request may hang past its deadline, and the cut
# host must rejoin. Everything stays inside the namespaces this script makes; they are removed on
# exit, also on failure.
#
# Usage: cluster_netns_test.sh PATH/TO/tokenlake MODEL_DIR
# Needs root (network namespaces), iproute2, etcd and curl; exits 77 (skipped) without them.
set -u
bin="$(realpath "$1")"
model="$(realpath "$2")"
skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root to make network namespaces"
command -v ip >/dev/null || skip "needs iproute2 (ip)"
command -v etcd >/dev/null || skip "needs etcd (scripts/install-deps.sh installs etcd-server)"
command -v curl >/dev/null || skip "needs curl"
tag="tl$(( $$ % 100000 ))"
ip netns add "$tag-probe" 2>/dev/null || skip "cannot make network namespaces here"
ip netns del "$tag-probe"

tmp="$(mktemp -d)"
hosts=(etcd c1 c2 i0 i1 i2 cl)
declare -A addr=([etcd]=198.51.100.2 [c1]=198.51.100.11 [c2]=198.51.100.12 [i0]=198.51.100.20
                 [i1]=198.51.100.21 [i2]=198.51.100.22 [cl]=198.51.100.30)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  pkill -9 -f -- "--tls-dir $tmp/" 2>/dev/null
  pkill -9 -f -- "--data-dir $tmp/etcd" 2>/dev/null
  for h in "${hosts[@]}" sw; do ip netns del "$tag-$h" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$tmp"/*.log; do echo "--- $f"; tail -5 "$f"; done
  if [ -n "${DEBUG:-}" ]; then
    ETCDCTL_API=3 in_ns cl etcdctl --endpoints "${etcd_url:-}" get --prefix /tokenlake
    for h in c1 c2; do in_ns cl curl -s -m 3 "http://${addr[$h]}:8000/healthz"; echo; done
    ps aux | grep -c '[t]okenlake coordinator'
  fi
  exit 1
}
in_ns() { local h="$1"; shift; ip netns exec "$tag-$h" "$@"; }

# The switch: a bridge in its own namespace; each host's veth peer plugs into it.
ip netns add "$tag-sw"
in_ns sw ip link add br0 type bridge
in_ns sw ip link set br0 up
for h in "${hosts[@]}"; do
  ip netns add "$tag-$h"
  ip link add "$tag$h" type veth peer name "p$tag$h" || fail "cannot make a veth pair"
  ip link set "$tag$h" netns "$tag-$h"
  ip link set "p$tag$h" netns "$tag-sw"
  in_ns sw ip link set "p$tag$h" master br0 up
  in_ns "$h" ip link set lo up
  in_ns "$h" ip addr add "${addr[$h]}/24" dev "$tag$h"
  in_ns "$h" ip link set "$tag$h" up
done

# Certificates: one CA, one certificate per host naming its address.
"$bin" certs --out "$tmp/ca" >/dev/null || fail "certs"
for h in c1 c2 i0 i1 i2; do
  "$bin" certs --out "$tmp/$h" --host "${addr[$h]}" --ca "$tmp/ca" >/dev/null || fail "certs $h"
done
printf 'sk-netns-test-key tenant=t\n' >"$tmp/keys.txt"
export TOKENLAKE_CLUSTER_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

ip netns exec "$tag-etcd" etcd --data-dir "$tmp/etcd" --listen-client-urls "http://${addr[etcd]}:2379" \
  --advertise-client-urls "http://${addr[etcd]}:2379" --listen-peer-urls "http://127.0.0.1:2380" \
  --initial-advertise-peer-urls "http://127.0.0.1:2380" --initial-cluster "default=http://127.0.0.1:2380" \
  --log-level error >"$tmp/etcd.log" 2>&1 &
pids+=($!)
etcd_url="http://${addr[etcd]}:2379"

# Coordinators under a supervisor loop too: a leader that loses its lease (a loaded machine can
# delay its renewals) exits with code 3 and comes back as a follower.
start_coordinator() {
  local h="$1"
  ip netns exec "$tag-$h" bash -c 'while true; do "$@"; sleep 0.5; done' supervise "$bin" coordinator --model "$model" --instances 3 --slots 256 \
    --http-listen "${addr[$h]}:8000" --grpc-listen "${addr[$h]}:8001" --tls-dir "$tmp/$h" \
    --api-key-file "$tmp/keys.txt" --etcd "$etcd_url" --cluster netns --lease-ms 3000 \
    --fault-drop 0.02 --fault-delay-ms 5 --dead-after-ms 1500 >>"$tmp/$h.log" 2>&1 &
  pids+=($!)
}
start_coordinator c1
sleep 1
start_coordinator c2
# Instances under a supervisor loop: one cut off from etcd past its lease exits (code 3) and is
# started again, as a deployment's supervisor would.
for k in 0 1 2; do
  ip netns exec "$tag-i$k" bash -c 'while true; do "$@"; sleep 0.5; done' supervise "$bin" instance \
    --model "$model" --id "$k" --name "i$k" --slots 256 --listen "${addr[i$k]}" \
    --tls-dir "$tmp/i$k" --etcd "$etcd_url" --cluster netns --lease-ms 3000 \
    >>"$tmp/i$k.log" 2>&1 &
  pids+=($!)
done

# Reference answers from one process with no cluster at all.
prompt() { python3 -c "import sys; k=int(sys.argv[1]); print(','.join(str((i*37+11)%512) for i in range(40)) + ',' + ','.join(str((k*101+i*13)%512) for i in range(5)))" "$1"; }
: >"$tmp/prompts.jsonl"
for k in $(seq 0 11); do echo "{\"input_ids\": [$(prompt "$k")]}" >>"$tmp/prompts.jsonl"; done
"$bin" generate --model "$model" --prompts "$tmp/prompts.jsonl" --max-new-tokens 3 \
  --arrival sequential --json "$tmp/ref.json" >/dev/null 2>&1 || fail "reference generate"
ref() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][int(sys.argv[2])]['tokens'])" "$tmp/ref.json" "$1"; }

# ask K HOST: one completion through HOST (following a redirect to the leader), 40 s at most;
# prints the tokens, or nothing.
ask() {
  in_ns cl curl -s -L -m 40 -X POST "http://${addr[$2]}:8000/v1/completions" \
    -H "Authorization: Bearer sk-netns-test-key" \
    -d "{\"prompt\": [$(prompt "$1")], \"max_tokens\": 3}" |
    python3 -c "import json,sys
try: print(json.load(sys.stdin)['choices'][0]['tokens'])
except Exception: pass"
}
# expect K HOST: retries for up to 30 s until answered; the answer must equal the reference.
expect() {
  local deadline=$((SECONDS + 30)) got h
  while [ $SECONDS -lt $deadline ]; do
    for h in "$2" c1 c2; do
      got="$(ask "$1" "$h")"
      [ -n "$got" ] && break
    done
    if [ -n "$got" ]; then
      [ "$got" = "$(ref "$1")" ] || fail "request $1 via $2: got $got, want $(ref "$1")"
      return 0
    fi
    sleep 0.3
  done
  fail "request $1 via $2 unanswered for 30 s"
}
live() { in_ns cl curl -s -m 5 "http://${addr[$1]}:8000/healthz" | grep -o '"live_instances": *[0-9]*' | grep -o '[0-9]*$'; }

for k in 0 1 2 3; do expect "$k" c1; done
echo "ok: 4 answers through the cluster equal the reference"
# The leader answers a request itself (200); the follower redirects (307).
leader=""
for h in c1 c2; do
  code=$(in_ns cl curl -s -m 10 -o /dev/null -w '%{http_code}' -X POST "http://${addr[$h]}:8000/v1/completions" \
    -H "Authorization: Bearer sk-netns-test-key" -d '{"prompt": [1], "max_tokens": 1}')
  echo "coordinator $h answers $code"
  [ "$code" = 200 ] && leader=$h
done
[ -n "$leader" ] || fail "no coordinator leads"
other=$([ "$leader" = c1 ] && echo c2 || echo c1)
code=$(in_ns cl curl -s -m 5 -o /dev/null -w '%{http_code}' -X POST "http://${addr[$leader]}:8000/v1/completions" -d '{"prompt": [1]}')
[ "$code" = 401 ] || fail "a request without a key got $code, want 401"
echo "ok: no key, 401"

# Kill the leader (its process and its supervisor, as a lost host would be): the other
# coordinator takes over, the instances follow it.
pkill -9 -f -- "--grpc-listen ${addr[$leader]}:8001 --tls-dir" || fail "no leader process to kill"
t0=$SECONDS
expect 4 "$other"
echo "ok: leader $leader killed, $other answered right after $((SECONDS - t0)) s"
for k in 5 6; do expect "$k" "$other"; done

# Cut instance host i2 off, keep serving, heal it, and see it rejoin.
in_ns sw ip link set "p${tag}i2" down
for k in 7 8 9; do expect "$k" "$other"; done
echo "ok: answers right with i2 cut off"
in_ns sw ip link set "p${tag}i2" up
deadline=$((SECONDS + 40))
until [ "$(live "$other")" = 3 ]; do
  [ $SECONDS -lt $deadline ] || fail "i2 did not rejoin within 40 s (live: $(live "$other"))"
  sleep 0.5
done
echo "ok: i2 rejoined"
for k in 10 11; do expect "$k" "$other"; done
echo "netns: all checks passed"
