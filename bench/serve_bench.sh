#!/usr/bin/env bash
# Serving benchmark: a Mixtral-shaped model (hidden 1024, 8 experts of FFN 3584, top-2, 8 layers,
# bf16) served by the embedded cluster, driven by serve_load at several concurrencies.
#   bench/serve_bench.sh [BUILD_DIR] [SECONDS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
SECS="${2:-20}"
SY="$BUILD/apps/switchyard"
MODEL="${SWITCHYARD_BENCH_MODEL:-$HOME/.cache/switchyard/bench-mixtral-h1024-e8-f3584-l8}"
[ -f "$MODEL/model.safetensors.index.json" ] ||
  "$SY" make-model --family mixtral --hidden 1024 --ffn 3584 --experts 8 --top-k 2 --layers 8 --vocab 32000 \
    --heads 16 --kv-heads 4 --dtype bf16 --out "$MODEL"
LOG="$(mktemp)"
"$SY" serve --model "$MODEL" --http 127.0.0.1:0 --hosts 4 > "$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do grep -q "^serving" "$LOG" && break; sleep 0.1; done
PORT="$(sed -n 's#^serving .* on http://[^:]*:\([0-9]*\) .*#\1#p' "$LOG")"
[ -n "$PORT" ] || { cat "$LOG"; exit 1; }
"$BUILD/bench/serve_load" --port "$PORT" --seconds "$SECS" --concurrency 1,8,32,128 --prompt-tokens 64 \
  --max-tokens 64 --vocab 32000 --label embedded
