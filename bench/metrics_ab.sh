#!/usr/bin/env bash
# Metrics on vs off, paired: two embedded clusters run side by side (`serve`, and `serve
# --no-metrics`), idle but for the one being measured, and serve_load drives them in turn for
# SECONDS each, PAIRS times (order alternating), so that other work on the machine falls on both
# alike. Prints each pair's output tokens/s and the mean and spread of the on/off ratio.
#   bench/metrics_ab.sh [BUILD_DIR] [SECONDS] [PAIRS] [CONCURRENCY]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"; SECS="${2:-8}"; PAIRS="${3:-16}"; CONC="${4:-8}"
SY="$BUILD/apps/switchyard"; LOAD="$BUILD/bench/serve_load"
MODEL="${SWITCHYARD_BENCH_MODEL:-$HOME/.cache/switchyard/bench-mixtral-h1024-e8-f3584-l8}"
# Made once, never over an existing model folder.
[ -e "$MODEL/config.json" ] ||
  "$SY" make-model --family mixtral --hidden 1024 --ffn 3584 --experts 8 --top-k 2 --layers 8 --vocab 32000 \
    --heads 16 --kv-heads 4 --dtype bf16 --out "$MODEL"
TMP="$(mktemp -d)"; PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
start() {  # name extra-args... (in this shell, not a $(...) subshell: cleanup must see the PID)
  local name="$1"; shift
  "$SY" serve --model "$MODEL" --http 127.0.0.1:0 --hosts 4 "$@" > "$TMP/$name" 2>&1 & PIDS+=($!)
}
port_of() {  # name
  for _ in $(seq 1 600); do
    local p; p="$(sed -n 's#^serving .* on http://[^:]*:\([0-9]*\) .*#\1#p' "$TMP/$1")"; [ -n "$p" ] && { echo "$p"; return; }
    sleep 0.1
  done
  cat "$TMP/$1" >&2; return 1
}
start on; start off --no-metrics
ON="$(port_of on)"; OFF="$(port_of off)"
( while sleep 15; do curl -sf "127.0.0.1:$ON/metrics" > /dev/null || true; done ) & PIDS+=($!)
tps() { "$LOAD" --port "$1" --seconds "$SECS" --concurrency "$CONC" --prompt-tokens 64 --max-tokens 64 --vocab 32000 | awk '$2 ~ /^[0-9]+$/ {print $5}'; }
tps "$ON" > /dev/null; tps "$OFF" > /dev/null  # warm-up
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) -eq 1 ]; then a="$(tps "$ON")"; b="$(tps "$OFF")"; else b="$(tps "$OFF")"; a="$(tps "$ON")"; fi
  echo "pair $i: on $a, off $b"
done | tee "$TMP/pairs"
awk '{gsub(",", ""); r = $4 / $6; s += r; ss += r * r; n++; on += $4; off += $6}
     END {m = s / n; sd = sqrt((ss - n * m * m) / (n - 1));
          printf "on %.1f, off %.1f tokens/s (means); on/off per pair: mean %.3f, sd %.3f, standard error %.3f (n = %d)\n", on / n, off / n, m, sd, sd / sqrt(n), n}' "$TMP/pairs"
