#!/usr/bin/env bash
# Serving benchmark: a Mixtral-shaped model (hidden 1024, 8 experts of FFN 3584, top-2, 8 layers,
# bf16), served (1) by the embedded cluster and (2) by a router + 4 expert-host processes on
# loopback (UCX), each driven by serve_load at concurrency 1, 8, 32, 128; prints both and the ratio.
#   bench/serve_bench.sh [BUILD_DIR] [SECONDS_PER_LEVEL]
# Environment: SWITCHYARD_BENCH_CONCURRENCY (default 1,8,32,128), SWITCHYARD_BENCH_MODEL,
# SWITCHYARD_BENCH_ROUTER_ARGS (extra router flags, e.g. "--micro-batches 1"),
# SWITCHYARD_BENCH_SKIP_EMBEDDED=1 (cluster only), SWITCHYARD_BENCH_HOST_THREADS (compute threads per
# expert host, default 1), SWITCHYARD_BENCH_ROUTER_THREADS (default: all cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
SECS="${2:-20}"
SY="$BUILD/apps/switchyard"
LOAD="$BUILD/bench/serve_load"
CONC="${SWITCHYARD_BENCH_CONCURRENCY:-1,8,32,128}"
MODEL="${SWITCHYARD_BENCH_MODEL:-$HOME/.cache/switchyard/bench-mixtral-h1024-e8-f3584-l8}"
export UCX_NET_DEVICES=lo
[ -f "$MODEL/config.json" ] ||
  "$SY" make-model --family mixtral --hidden 1024 --ffn 3584 --experts 8 --top-k 2 --layers 8 --vocab 32000 \
    --heads 16 --kv-heads 4 --dtype bf16 --out "$MODEL"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
wait_port() {  # file regex-with-capture
  for _ in $(seq 1 600); do
    local v; v="$(sed -n "s#$2#\\1#p" "$1" | head -n1)"
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.1
  done
  cat "$1" >&2; return 1
}
wait_ready() { for _ in $(seq 1 600); do curl -sf "127.0.0.1:$1/readyz" > /dev/null && return 0; sleep 0.1; done; return 1; }
# One short request before measuring: the first request pays page faults on the weights and, in the
# cluster, the data-plane connections' setup, which are start-up costs, not serving throughput.
warm_up() { curl -sf "127.0.0.1:$1/v1/completions" -d '{"prompt": [1, 2, 3, 4], "max_tokens": 4}' > /dev/null || true; }
load() { warm_up "$1"; "$LOAD" --port "$1" --seconds "$SECS" --concurrency "$CONC" --prompt-tokens 64 --max-tokens 64 --vocab 32000 --label "$2"; }

# (1) embedded
if [ "${SWITCHYARD_BENCH_SKIP_EMBEDDED:-0}" != 1 ]; then
  "$SY" serve --model "$MODEL" --http 127.0.0.1:0 --hosts 4 > "$TMP/serve" 2>&1 & PIDS+=($!)
  PORT="$(wait_port "$TMP/serve" '^serving .* on http://[^:]*:\([0-9]*\) .*')"
  load "$PORT" embedded | tee "$TMP/embedded.txt"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
fi

# (2) router + 4 expert-host processes. Co-located on this machine's cores, their OpenMP threads must
# sleep rather than spin between parallel regions, or the router's spinning threads starve the hosts
# (measured on 2 cores: 0.11 of embedded at concurrency 1 with spinning, 0.73 without). On hosts of
# their own the default (spinning) is right.
export OMP_WAIT_POLICY=passive
"$SY" coordinator --listen 127.0.0.1:0 --model "$MODEL" --hosts 4 > "$TMP/coord" 2>&1 & PIDS+=($!)
CP="$(wait_port "$TMP/coord" '.*listening on [^:]*:\([0-9]*\).*')"
for h in 0 1 2 3; do
  "$SY" expert-host --coordinator "127.0.0.1:$CP" --model "$MODEL" --slots 64 --threads "${SWITCHYARD_BENCH_HOST_THREADS:-1}" --name "host$h" > "$TMP/h$h" 2>&1 & PIDS+=($!)
done
# shellcheck disable=SC2086  # word-splitting of the extra flags is intended
"$SY" router --coordinator "127.0.0.1:$CP" --model "$MODEL" --http 127.0.0.1:0 \
  ${SWITCHYARD_BENCH_ROUTER_THREADS:+--threads "$SWITCHYARD_BENCH_ROUTER_THREADS"} ${SWITCHYARD_BENCH_ROUTER_ARGS:-} > "$TMP/router" 2>&1 & PIDS+=($!)
RP="$(wait_port "$TMP/router" '.*serving HTTP on [^:]*:\([0-9]*\).*')"
wait_ready "$RP"
load "$RP" cluster | tee "$TMP/cluster.txt"

[ -f "$TMP/embedded.txt" ] || exit 0
echo
echo "cluster / embedded output tokens/s (target >= 0.85 at concurrency >= 32):"
paste <(awk '$1=="embedded"{print $2, $5}' "$TMP/embedded.txt") <(awk '$1=="cluster"{print $5}' "$TMP/cluster.txt") |
  awk '{printf "  concurrency %4d: embedded %8.1f, cluster %8.1f, ratio %.2f\n", $1, $2, $3, ($2 > 0 ? $3 / $2 : 0)}'
