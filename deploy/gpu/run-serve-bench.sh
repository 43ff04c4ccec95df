#!/usr/bin/env bash
# The serving benchmark on the GPU machine's CPU cores (16 there, against 2 on the development VM),
# so that the router and the expert hosts have cores of their own: the embedded cluster, the
# cluster with two micro-batches in ping-pong (the default) and with one. Expects
# `deploy/gpu/pack.sh serve` in .device/. The model is made under /tmp (1.6 GB; not under OUTDIR).
#
#   deploy/gpu/run-serve-bench.sh [OUTDIR] [SECONDS_PER_LEVEL]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PACK="$ROOT/.device"
OUT="${1:-${OUT:-/tmp/sy-serve-out}}"
SECS="${2:-20}"
mkdir -p "$OUT"
command -v curl > /dev/null || { echo "error: curl is needed by bench/serve_bench.sh" >&2; exit 1; }
export LD_LIBRARY_PATH="$PACK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export UCX_MODULE_DIR="$PACK/lib/ucx"
export SWITCHYARD_BENCH_MODEL="${SWITCHYARD_BENCH_MODEL:-/tmp/sy-bench-model}"
CORES="$(nproc)"
# The embedded cluster uses every core in one pool; the cluster gives each of the 4 hosts an eighth
# of the cores and the router half.
export SWITCHYARD_BENCH_HOST_THREADS="${SWITCHYARD_BENCH_HOST_THREADS:-$(( CORES / 8 > 0 ? CORES / 8 : 1 ))}"
export SWITCHYARD_BENCH_ROUTER_THREADS="${SWITCHYARD_BENCH_ROUTER_THREADS:-$(( CORES / 2 > 0 ? CORES / 2 : 1 ))}"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); hosts x$SWITCHYARD_BENCH_HOST_THREADS threads, router x$SWITCHYARD_BENCH_ROUTER_THREADS" | tee "$OUT/machine.txt"
"$ROOT/bench/serve_bench.sh" "$PACK/build" "$SECS" 2>&1 | grep -v '^writing weights' | tee "$OUT/serve_mb2.txt"
SWITCHYARD_BENCH_SKIP_EMBEDDED=1 SWITCHYARD_BENCH_ROUTER_ARGS="--micro-batches 1" \
  "$ROOT/bench/serve_bench.sh" "$PACK/build" "$SECS" 2>&1 | grep -v '^writing weights' | tee "$OUT/serve_mb1.txt"
