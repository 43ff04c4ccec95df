#!/usr/bin/env bash
# Metrics on vs off on the serving benchmark's model (bench/serve_bench.sh): the embedded cluster
# (`switchyard serve --hosts 4`) driven by serve_load, alternating runs with metrics recorded (the
# default, metrics.per_expert = all) and with --no-metrics, ROUNDS times; a Prometheus-like scrape of
# /metrics every SCRAPE seconds during the "on" runs. Prints each run and the on/off ratio of output
# tokens/s per concurrency (mean over rounds); with one concurrency level, also the server's CPU time
# per output token.
#   bench/metrics_overhead.sh [BUILD_DIR] [SECONDS_PER_LEVEL] [ROUNDS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
SECS="${2:-20}"
ROUNDS="${3:-2}"
SY="$BUILD/apps/switchyard"
LOAD="$BUILD/bench/serve_load"
CONC="${SWITCHYARD_BENCH_CONCURRENCY:-1,8,32}"
SCRAPE="${SWITCHYARD_BENCH_SCRAPE:-15}"
MODEL="${SWITCHYARD_BENCH_MODEL:-$HOME/.cache/switchyard/bench-mixtral-h1024-e8-f3584-l8}"
# Made once, never over an existing model folder.
[ -e "$MODEL/config.json" ] ||
  "$SY" make-model --family mixtral --hidden 1024 --ffn 3584 --experts 8 --top-k 2 --layers 8 --vocab 32000 \
    --heads 16 --kv-heads 4 --dtype bf16 --out "$MODEL"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
run() {  # label extra-args...
  local label="$1"; shift
  "$SY" serve --model "$MODEL" --http 127.0.0.1:0 --hosts 4 "$@" > "$TMP/serve" 2>&1 & PIDS+=($!)
  local port=""
  for _ in $(seq 1 600); do
    port="$(sed -n 's#^serving .* on http://[^:]*:\([0-9]*\) .*#\1#p' "$TMP/serve")"; [ -n "$port" ] && break; sleep 0.1
  done
  local scraper=""
  if [ "$label" = on ]; then
    ( while sleep "$SCRAPE"; do curl -sf "127.0.0.1:$port/metrics" > /dev/null || true; done ) & scraper=$!
  fi
  local cpu0; cpu0="$(awk '{print $14 + $15}' "/proc/${PIDS[-1]}/stat")"
  "$LOAD" --port "$port" --seconds "$SECS" --concurrency "$CONC" --prompt-tokens 64 --max-tokens 64 --vocab 32000 \
    --label "$label" | tee -a "$TMP/all.txt"
  # The server's CPU time over the load (all its threads), per output token: less sensitive than
  # tokens/s to other work on the machine.
  local cpu1; cpu1="$(awk '{print $14 + $15}' "/proc/${PIDS[-1]}/stat")"
  awk -v l="$label" -v c=$(( cpu1 - cpu0 )) -v hz="$(getconf CLK_TCK)" -v s="$SECS" -v conc="$CONC" \
    '$1==l {last=$5} END {if (last > 0 && conc !~ /,/) printf "%s cpu %.1f s, %.2f ms per output token\n", l, c/hz, 1000*c/hz/(last*s)}' \
    "$TMP/all.txt" | tee -a "$TMP/cpu.txt"
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null || true
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
}
# ABBA order (on off, off on, ...): a drift over time does not favour either.
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then run on; run off --no-metrics; else run off --no-metrics; run on; fi
done
echo
echo "metrics on / off, output tokens/s (mean of $ROUNDS runs each):"
awk '$1=="on"||$1=="off" {s[$1" "$2]+=$5; n[$1" "$2]++; c[$2]=1}
     END {for (k in c) printf "  concurrency %4d: on %8.1f, off %8.1f, on/off %.3f\n", k, s["on "k]/n["on "k], s["off "k]/n["off "k], (s["on "k]/n["on "k])/(s["off "k]/n["off "k])}' \
  "$TMP/all.txt" | sort -k2 -n
[ -s "$TMP/cpu.txt" ] && awk '{ms[$1]+=$6; n[$1]++} END {printf "server CPU per output token: on %.2f ms, off %.2f ms, on/off %.3f\n", ms["on"]/n["on"], ms["off"]/n["off"], (ms["on"]/n["on"])/(ms["off"]/n["off"])}' "$TMP/cpu.txt"
