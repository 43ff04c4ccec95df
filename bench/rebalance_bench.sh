#!/usr/bin/env bash
# Live rebalancing under a skewed load: a DeepSeek-V3-shaped model whose gate is biased so that
# two experts of every layer (0 and 4, which the initial placement puts on the same host) take
# most tokens; a coordinator, 4 expert-host processes, each held to the same CPU quota (a cgroup,
# so an overloaded host costs time as it would on a machine of its own), and a router on loopback.
#   phase 1  load at fixed concurrency: output tokens/s with the initial placement
#   phase 2  the same load; a rebalance (switchyard ctl rebalance) runs in the middle of it
#   phase 3  the same load again, after the rebalance
# Prints tokens/s before and after and the ratio (target >= 1.5), and fails if any request failed.
#   bench/rebalance_bench.sh [BUILD_DIR] [SECONDS_PER_PHASE]
# Needs root for the cgroup (cgroup v1 cpu controller or cgroup v2); without it the hosts share
# the machine unevenly and the figure says little (the script says so and stops).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
SECS="${2:-20}"
SY="$BUILD/apps/switchyard"
LOAD="$BUILD/bench/serve_load"
CONC="${SWITCHYARD_BENCH_CONCURRENCY:-16}"
QUOTA_PCT="${SWITCHYARD_BENCH_HOST_CPU_PCT:-25}"   # per expert host, % of one core
HOT_BIAS="${SWITCHYARD_BENCH_HOT_BIAS:-0.2}"
MODEL="${SWITCHYARD_BENCH_MODEL:-$HOME/.cache/switchyard/bench-dsv3-skewed${HOT_BIAS}-h512-e8-f2048-l5}"
export UCX_NET_DEVICES=lo OMP_WAIT_POLICY=passive
export SWITCHYARD_ADMIN_TOKEN="bench-$RANDOM$RANDOM"
[ -f "$MODEL/config.json" ] ||
  "$SY" make-model --family deepseek_v3 --hidden 512 --ffn 2048 --experts 8 --top-k 2 --layers 5 --first-dense 1 \
    --shared-experts 0 --groups 1 --topk-groups 1 --heads 8 --vocab 4096 --dtype bf16 \
    --hot-experts 0,4 --hot-bias "$HOT_BIAS" --out "$MODEL" > /dev/null

# One cgroup per host with the same CPU quota.
CG=""
if [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu ]; then CG=v1
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && [ -w /sys/fs/cgroup ]; then CG=v2
else echo "rebalance_bench: needs a writable cgroup cpu controller (run as root)" >&2; exit 2; fi
TMP="$(mktemp -d)"
PIDS=()
GROUPS_MADE=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  for g in "${GROUPS_MADE[@]}"; do rmdir "$g" 2>/dev/null || true; done
  [ -n "${KEEP_TMP:-}" ] && echo "logs in $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT
limit() {  # pid name
  local g
  if [ "$CG" = v1 ]; then
    g="/sys/fs/cgroup/cpu/switchyard-bench-$2"; mkdir -p "$g"
    echo 100000 > "$g/cpu.cfs_period_us"; echo $((QUOTA_PCT * 1000)) > "$g/cpu.cfs_quota_us"
  else
    g="/sys/fs/cgroup/switchyard-bench-$2"; mkdir -p "$g"
    echo "$((QUOTA_PCT * 1000)) 100000" > "$g/cpu.max"
  fi
  GROUPS_MADE+=("$g")
  # every thread of the process
  for t in /proc/"$1"/task/*; do echo "${t##*/}" > "$g/$( [ "$CG" = v1 ] && echo tasks || echo cgroup.threads)" 2>/dev/null || true; done
  echo "$1" > "$g/cgroup.procs" 2>/dev/null || true
}
wait_port() {
  for _ in $(seq 1 600); do
    local v; v="$(sed -n "s#$2#\\1#p" "$1" | head -n1)"
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.1
  done
  cat "$1" >&2; return 1
}
wait_ready() { for _ in $(seq 1 600); do curl -sf "127.0.0.1:$1/readyz" > /dev/null && return 0; sleep 0.1; done; return 1; }
load() { "$LOAD" --port "$1" --seconds "$SECS" --concurrency "$CONC" --prompt-tokens 32 --max-tokens 32 --vocab 4096 --label "$2"; }

"$SY" coordinator --listen 127.0.0.1:0 --model "$MODEL" --hosts 4 > "$TMP/coord" 2>&1 & PIDS+=($!)
CP="$(wait_port "$TMP/coord" '.*listening on [^:]*:\([0-9]*\).*')"
for h in 0 1 2 3; do
  "$SY" -v expert-host --coordinator "127.0.0.1:$CP" --model "$MODEL" --slots 24 --threads 1 --name "host$h" > "$TMP/h$h" 2>&1 &
  PIDS+=($!); limit "$!" "host$h"
done
"$SY" router --coordinator "127.0.0.1:$CP" --model "$MODEL" --http 127.0.0.1:0 > "$TMP/router" 2>&1 & PIDS+=($!)
RP="$(wait_port "$TMP/router" '.*serving HTTP on [^:]*:\([0-9]*\).*')"
wait_ready "$RP"
sleep 1
# Threads started after the cgroup move (UCX progress, OpenMP) join the cgroup of their process in
# v1 only if moved; move them again now that everything runs.
for h in 0 1 2 3; do limit "${PIDS[$((h + 1))]}" "host$h"; done

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # user + system ticks
cpu_snapshot() { for p in "${PIDS[@]}"; do cpu_of "$p"; done | tr '\n' ' '; }
cpu_report() {  # before-snapshot seconds
  local -a a=($1) b=($(cpu_snapshot)) names=(coordinator host0 host1 host2 host3 router)
  local hz; hz="$(getconf CLK_TCK)"
  printf '  CPU use (cores):'
  for i in "${!names[@]}"; do awk -v n="${names[$i]}" -v d="$(( ${b[$i]} - ${a[$i]} ))" -v hz="$hz" -v s="$2" 'BEGIN{printf " %s %.2f", n, d / hz / s}'; done
  echo
}
echo "== phase 1: initial placement (each expert host at ${QUOTA_PCT}% of a core)"
S0="$(cpu_snapshot)"
load "$RP" before | tee "$TMP/before.txt"
cpu_report "$S0" "$SECS"
for g in "${GROUPS_MADE[@]}"; do
  [ -f "$g/cpu.stat" ] && echo "  ${g##*/}: $(tr '\n' ' ' < "$g/cpu.stat")"
done
echo "== phase 2: rebalance while the load runs"
load "$RP" during > "$TMP/during.txt" & LP=$!
sleep "$(awk -v s="$SECS" 'BEGIN{print s/3}')"
"$SY" ctl rebalance --router "127.0.0.1:$RP" | tee "$TMP/summary.json"
wait "$LP"; cat "$TMP/during.txt"
echo "== phase 3: after the rebalance"
S0="$(cpu_snapshot)"
load "$RP" after | tee "$TMP/after.txt"
cpu_report "$S0" "$SECS"
for h in 0 1 2 3; do grep -h "replicas" "$TMP/h$h" | tail -n 2 | sed "s/^/  host$h: /"; done

B="$(awk '$1=="before"{print $5}' "$TMP/before.txt")"
A="$(awk '$1=="after"{print $5}' "$TMP/after.txt")"
ERR="$(awk '$1=="before"||$1=="during"||$1=="after"{e+=$4} END{print e+0}' "$TMP/before.txt" "$TMP/during.txt" "$TMP/after.txt")"
echo
awk -v b="$B" -v a="$A" -v e="$ERR" 'BEGIN{printf "output tokens/s: before %.1f, after %.1f, ratio %.2f (target >= 1.5); failed requests: %d\n", b, a, (b > 0 ? a / b : 0), e}'
[ "$ERR" -eq 0 ]
