#!/usr/bin/env bash
# Series counts of /metrics, measured on live processes: for each model folder, the embedded
# cluster (`switchyard serve`, every role in one process) per metrics.per_expert mode, and the
# multi-process cluster per role (coordinator, one expert host, router), after some traffic.
#   bench/metrics_series.sh BUILD_DIR HOSTS MODEL_DIR...
# Prints: model, process, mode, series (sample lines of /metrics), bytes of the exposition.
set -euo pipefail
BUILD="${1:?build dir}"; HOSTS="${2:?hosts}"; shift 2
SY="$BUILD/apps/switchyard"
export UCX_NET_DEVICES=lo OMP_WAIT_POLICY=passive
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
port_of() {  # file regex-with-capture
  for _ in $(seq 1 600); do
    local v; v="$(sed -n "s#$2#\\1#p" "$1" | head -n1)"
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.1
  done
  cat "$1" >&2; return 1
}
traffic() {  # port
  for _ in $(seq 1 300); do curl -sf "127.0.0.1:$1/readyz" > /dev/null && break; sleep 0.1; done
  for i in 1 2 3 4 5 6 7 8; do
    curl -sf "127.0.0.1:$1/v1/completions" -d "{\"prompt\": [$i, 2, 3, 4, 5], \"max_tokens\": 4}" > /dev/null
  done
  sleep 1.2  # a load report reaches the coordinator (balancedness)
}
count() {  # label addr
  curl -sf "http://$2/metrics" > "$TMP/m"; curl -sf "http://$2/metrics" > "$TMP/m"
  printf '%-28s %-14s %-8s %7d %9d\n' "$MODEL_NAME" "$1" "$MODE" "$(grep -vc '^#' "$TMP/m")" "$(wc -c < "$TMP/m")"
}
printf '%-28s %-14s %-8s %7s %9s\n' model process mode series bytes
for MODEL in "$@"; do
  MODEL_NAME="$(basename "$MODEL")"
  for MODE in all top:16 off; do
    "$SY" serve --model "$MODEL" --http 127.0.0.1:0 --hosts "$HOSTS" --threads 1 --metrics-per-expert "$MODE" > "$TMP/serve" 2>&1 & PIDS+=($!)
    P="$(port_of "$TMP/serve" '^serving .* on http://[^:]*:\([0-9]*\) .*')"
    traffic "$P"; count embedded "127.0.0.1:$P"
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
  done
  MODE=all
  "$SY" coordinator --listen 127.0.0.1:0 --model "$MODEL" --hosts "$HOSTS" --metrics 127.0.0.1:0 > "$TMP/coord" 2>&1 & PIDS+=($!)
  CP="$(port_of "$TMP/coord" '.*listening on [^:]*:\([0-9]*\).*')"
  CM="$(port_of "$TMP/coord" '.*metrics on \([0-9.:]*\).*')"
  for h in $(seq 1 "$HOSTS"); do
    "$SY" expert-host --coordinator "127.0.0.1:$CP" --model "$MODEL" --slots 100000 --threads 1 --name "host$h" \
      --metrics 127.0.0.1:0 > "$TMP/h$h" 2>&1 & PIDS+=($!)
  done
  HM="$(port_of "$TMP/h1" '.*metrics on \([0-9.:]*\).*')"
  "$SY" router --coordinator "127.0.0.1:$CP" --model "$MODEL" --http 127.0.0.1:0 --threads 1 > "$TMP/router" 2>&1 & PIDS+=($!)
  RP="$(port_of "$TMP/router" '.*serving HTTP on [^:]*:\([0-9]*\).*')"
  traffic "$RP"
  count coordinator "$CM"; count expert-host "$HM"; count router "127.0.0.1:$RP"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=()
done
