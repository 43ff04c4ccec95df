#!/usr/bin/env bash
# Multi-host test: the coordinator, three expert hosts and the router each in a network namespace of
# its own with its own address on a private bridge, UCX over TCP between them; the answers must
# equal transformers' greedy tokens. Skips (exit 77) only when namespaces cannot be created.
#   netns_test.sh SWITCHYARD_BINARY FIXTURE_DIR
set -uo pipefail
SY="$1"
MODEL="$2"
NET=10.213.7
BR=sybr$$
TAG=sy$$
NS=(c h0 h1 h2 r)
cleanup() {
  for n in "${NS[@]}"; do
    ip netns pids "$TAG-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$TAG-$n" 2>/dev/null
  done
  ip link del "$BR" 2>/dev/null
}
trap cleanup EXIT
if ! ip netns add "$TAG-probe" 2>/dev/null; then
  echo "SKIPPED: cannot create network namespaces (needs root and iproute2)"
  exit 77
fi
ip netns del "$TAG-probe"
ip link add "$BR" type bridge && ip addr add "$NET.1/24" dev "$BR" && ip link set "$BR" up || { echo "cannot create the bridge"; exit 1; }
i=2
declare -A ADDR
for n in "${NS[@]}"; do
  ns="$TAG-$n"
  ip netns add "$ns"
  ip link add "v$TAG$n" type veth peer name eth0 netns "$ns"
  ip link set "v$TAG$n" master "$BR" up
  ip -n "$ns" addr add "$NET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ADDR[$n]="$NET.$i"
  i=$((i + 1))
done
export UCX_TLS=tcp UCX_NET_DEVICES=eth0
run() { local n=$1; shift; ip netns exec "$TAG-$n" "$@"; }
wait_line() {  # file pattern → prints the first capture of the line
  for _ in $(seq 1 300); do
    local v
    v="$(sed -n "s#$2#\\1#p" "$1" | head -n1)"
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; return 1
}
LOG="$(mktemp -d)"
run c "$SY" coordinator --listen "${ADDR[c]}:0" --model "$MODEL" --hosts 3 --replicas 1 > "$LOG/c" 2>&1 &
CP="$(wait_line "$LOG/c" '.*listening on [^:]*:\([0-9]*\).*')" || exit 1
for h in h0 h1 h2; do
  run "$h" "$SY" expert-host --coordinator "${ADDR[c]}:$CP" --model "$MODEL" --slots 64 --threads 1 \
    --listen "${ADDR[$h]}:0" --name "$h" > "$LOG/$h" 2>&1 &
done
run r "$SY" router --coordinator "${ADDR[c]}:$CP" --model "$MODEL" --http "${ADDR[r]}:0" --threads 1 > "$LOG/r" 2>&1 &
RP="$(wait_line "$LOG/r" '.*serving HTTP on [^:]*:\([0-9]*\).*')" || exit 1
for _ in $(seq 1 300); do
  run r curl -sf "http://${ADDR[r]}:$RP/readyz" > /dev/null && break
  sleep 0.1
done
python3 - "$MODEL/reference.safetensors" > "$LOG/req.json" <<'PY'
import json, struct, sys, array
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); base = 8 + n
def get(name):
    m = h[name]; f.seek(base + m["data_offsets"][0]); a = array.array("q")
    a.frombytes(f.read(m["data_offsets"][1] - m["data_offsets"][0])); return list(a), m["shape"]
ids, (b, t) = get("input_ids"); g, (_, gt) = get("greedy_ids")
prompts = [ids[i * t:(i + 1) * t] for i in range(b)]
expect = [g[i * gt + t:(i + 1) * gt] for i in range(b)]
print(json.dumps({"prompt": prompts, "max_tokens": gt - t, "expect": expect}))
PY
BODY="$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.pop("expect"); print(json.dumps(d))' "$LOG/req.json")"
RESP="$(run r curl -s "http://${ADDR[r]}:$RP/v1/completions" -d "$BODY")"
python3 - "$LOG/req.json" "$RESP" <<'PY'
import json, sys
want = json.load(open(sys.argv[1]))["expect"]
got = json.loads(sys.argv[2])
ids = [c["token_ids"] for c in got["choices"]]
print("hosts in namespaces answered:", ids)
if ids != want:
    print("MISMATCH: expected", want); sys.exit(1)
print("OK: equal to transformers' greedy tokens")
PY
