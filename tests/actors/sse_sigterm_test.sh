#!/usr/bin/env bash
# Streaming with a real client (curl -N) against `switchyard serve`, then SIGTERM while several
# streams run: every stream still ends with its last token and `data: [DONE]`, new requests are
# refused, and the server exits 0.
#   sse_sigterm_test.sh SWITCHYARD MODEL_DIR TOKENIZER_JSON
set -euo pipefail
SY="$1"; MODEL="$2"; TOK="$3"
command -v curl > /dev/null || { echo "curl is missing (deploy/setup.sh installs it)"; exit 1; }
TMP="$(mktemp -d)"
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$TMP"' EXIT
"$SY" serve --model "$MODEL" --tokenizer "$TOK" --http 127.0.0.1:0 --hosts 2 --shutdown-grace-s 60 > "$TMP/out" 2> "$TMP/err" &
PID=$!
for _ in $(seq 1 300); do
  PORT="$(sed -n 's#^serving .* on http://[^:]*:\([0-9]*\) .*#\1#p' "$TMP/out" | head -n1)"
  [ -n "$PORT" ] && break
  sleep 0.1
done
[ -n "${PORT:-}" ] || { cat "$TMP/out" "$TMP/err"; echo "serve did not start"; exit 1; }
URL="http://127.0.0.1:$PORT/v1/completions"

# 1. One stream read by curl: SSE frames, text chunks, usage, [DONE].
curl -sN "$URL" -d '{"prompt": "Hello world", "max_tokens": 12, "stream": true, "ignore_eos": true}' > "$TMP/one"
grep -q '^data: \[DONE\]$' "$TMP/one" || { cat "$TMP/one"; echo "no [DONE]"; exit 1; }
n="$(grep -c '"finish_reason":null' "$TMP/one")"
[ "$n" -eq 12 ] || { cat "$TMP/one"; echo "expected 12 token events, got $n"; exit 1; }
grep -q '"usage":{"completion_tokens":12' "$TMP/one" || { echo "no usage in the last chunk"; exit 1; }

# 2. SIGTERM while 4 streams of 150 tokens run.
for i in 1 2 3 4; do
  curl -sN "$URL" -d '{"prompt": "Once upon a time", "max_tokens": 150, "stream": true, "ignore_eos": true, "seed": '"$i"', "temperature": 0.7}' > "$TMP/s$i" &
  CURLS+=($!)
done
sleep 0.3
kill -TERM "$PID"
sleep 0.1
# New work is refused while the streams finish.
code="$(curl -s -o /dev/null -w '%{http_code}' "$URL" -d '{"prompt": [1, 2], "max_tokens": 2}' || true)"
for c in "${CURLS[@]}"; do wait "$c"; done
set +e
wait "$PID"; rc=$?
set -e
for i in 1 2 3 4; do
  grep -q '^data: \[DONE\]$' "$TMP/s$i" || { tail -c 600 "$TMP/s$i"; echo "stream $i lost its end"; exit 1; }
  n="$(grep -c '"finish_reason":null' "$TMP/s$i")"
  [ "$n" -eq 150 ] || { echo "stream $i: $n of 150 tokens"; exit 1; }
done
[ "$code" = "503" ] || [ "$code" = "000" ] || { echo "a request during the drain got $code (want 503, or refused)"; exit 1; }
[ "$rc" -eq 0 ] || { cat "$TMP/err"; echo "serve exited $rc"; exit 1; }
echo "ok: curl -N streams complete; SIGTERM drained 4 streams of 150 tokens, new request got $code, exit 0"
