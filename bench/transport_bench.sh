#!/usr/bin/env bash
# Data-plane benchmark: our UCX link (bench/transport_bench, two processes) next to ucx_perftest
# (ucp_am_lat, tag_lat, ucp_am_bw) for the same message sizes and the same UCX_TLS and segment
# size, measured in one run.
#
#   bench/transport_bench.sh [BUILD_DIR]
#
# Configurations (TRANSPORT_BENCH_CONFIGS, default "tcp shm"):
#   tcp  UCX_TLS=tcp, peer error handling on (ours) / -e (ucx_perftest): the cross-host setting
#   shm  UCX_TLS=$SHM_TLS (default sysv,cma,tcp), peer error handling off / no -e: same host
# Ours: p50/p99 round trip of one batch (rows × 4096 bf16, up to 8 segments) with call_sync,
# 2·payload/RTT, and the payload rate per direction with 8 batches (at most 8 MiB) in flight through send()
# (replies carry the same bytes back, so the link moves twice that). ucx_perftest ucp_am_lat reports half a round trip: RTT = 2 × its median. ucp_am_bw sends
# one way only. The AM header size (-H) is ours, so both move the same bytes per message.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
BENCH="${TRANSPORT_BENCH_BIN:-$BUILD/bench/transport_bench}"
PERFTEST="${UCX_PERFTEST:-$(command -v ucx_perftest || true)}"
CONFIGS="${TRANSPORT_BENCH_CONFIGS:-tcp shm}"
SHM_TLS="${SHM_TLS:-sysv,cma,tcp}"
ROWS="${TRANSPORT_BENCH_ROWS:-1,8,64,512}"
HIDDEN=4096
SERVER_SPIN_US="${SERVER_SPIN_US:-1000}"
WORKERS="${SERVER_WORKERS:-0}"
export UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
# Our runtime sets the shared-memory segment size to 16 KiB + 512 unless the environment does
# (transport/ucx_link.cpp); ucx_perftest gets the same value, so both run the same transport settings.
export UCX_SYSV_SEG_SIZE="${UCX_SYSV_SEG_SIZE:-16896}" UCX_POSIX_SEG_SIZE="${UCX_POSIX_SEG_SIZE:-16896}"
[ -x "$BENCH" ] || { echo "build transport_bench first ($BENCH)"; exit 1; }
[ -n "$PERFTEST" ] || { echo "ucx_perftest not found (Debian package ucx-utils)"; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

iters_for() {  # the same iteration counts as transport_bench: ~2 GiB per size, 200..20000
  local bytes=$1 n=$(( (2 * 1024 * 1024 * 1024) / $1 / 4 ))
  (( n < 200 )) && n=200
  (( n > 20000 )) && n=20000
  echo $n
}

perftest() {  # perftest TEST BYTES HEADER EXTRA... → prints its final line (-f)
  local test=$1 bytes=$2 header=$3; shift 3
  local n; n=$(iters_for "$bytes")
  local port=$(( 20000 + RANDOM % 20000 ))
  "$PERFTEST" -p "$port" "$@" > "$TMP/srv.log" 2>&1 &
  local spid=$!
  for _ in $(seq 1 200); do grep -q "Waiting for connection" "$TMP/srv.log" 2>/dev/null && break; sleep 0.02; done
  "$PERFTEST" 127.0.0.1 -p "$port" -t "$test" -s "$bytes" -H "$header" -n "$n" -w $(( n / 10 + 10 )) -f "$@" 2>/dev/null | tail -1
  wait "$spid" 2>/dev/null || true
}

echo "# $(date -u +%FT%TZ) $(uname -n) $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# UCX_SYSV_SEG_SIZE=$UCX_SYSV_SEG_SIZE UCX_POSIX_SEG_SIZE=$UCX_POSIX_SEG_SIZE"
echo "# ours: $BENCH --workers $WORKERS --server-spin-us $SERVER_SPIN_US; baseline: $PERFTEST ($("$PERFTEST" -h 2>&1 | head -0; ucx_info -v 2>/dev/null | head -1 | sed 's/# //'))"
for cfg in $CONFIGS; do
  case $cfg in
    tcp) export UCX_TLS=tcp; OURS_PEER=1; PT_FLAGS=(-e) ;;
    shm) export UCX_TLS=$SHM_TLS; OURS_PEER=0; PT_FLAGS=() ;;
    *) echo "unknown configuration $cfg"; exit 1 ;;
  esac
  "$BENCH" --rows "$ROWS" --hidden $HIDDEN --peer $OURS_PEER --workers "$WORKERS" \
    --server-spin-us "$SERVER_SPIN_US" > "$TMP/ours.log" 2> "$TMP/ours.err" || { cat "$TMP/ours.err" >&2; exit 1; }
  echo
  echo "## $cfg: UCX_TLS=$UCX_TLS, peer error handling $([ $OURS_PEER = 1 ] && echo on || echo off)"
  printf "%9s | %9s %9s %9s %6s %9s %6s | %7s %7s %8s %6s | %8s %8s %6s | %8s %8s %8s %6s %6s | %7s %7s | %6s\n" \
    bytes ours_p50 ours_p99 pt_rtt ratio tag_rtt ratio xc_new xc_same pt_new ratio ours_pp pt_pp ratio ours_1dir ours_2dir pt_bw r_1dir r_2dir hot_cpy cold_cpy allocs
  printf "%9s | %9s %9s %9s %6s %9s %6s | %7s %7s %8s %6s | %8s %8s %6s | %8s %8s %8s %6s %6s | %7s %7s | %6s\n" \
    "" "RTT us" "us" "us" "x" "us" "x" "us" "us" "us" "x" "GB/s" "GB/s" "" "GB/s" "GB/s" "GB/s" "" "" "GB/s" "GB/s" "/RTT"
  grep '^RESULT' "$TMP/ours.log" | while read -r _ rows bytes p50 p99 pp stream mc mcc al xn xs; do
    rows=${rows#rows=}; bytes=${bytes#bytes=}; p50=${p50#p50_us=}; p99=${p99#p99_us=}
    pp=${pp#pingpong_gbps=}; stream=${stream#stream_gbps=}; mc=${mc#memcpy_hot_gbps=}; mcc=${mcc#memcpy_cold_gbps=}
    al=${al#client_allocs_per_rtt=}; xn=${xn#xcore_new_us=}; xs=${xs#xcore_same_us=}
    segments=$(( rows < 8 ? rows : 8 ))
    header=$(( 40 + 16 * segments ))
    lat=$(perftest ucp_am_lat "$bytes" "$header" "${PT_FLAGS[@]}")
    bw=$(perftest ucp_am_bw "$bytes" "$header" "${PT_FLAGS[@]}")
    # tag_lat: the receiver takes each message into a buffer of its own, as ours does (ucp_am_lat's
    # responder answers without reading the data; in an eager message over shared memory the rows
    # then never cross between the two cores).
    tag=$(perftest tag_lat "$bytes" 0 "${PT_FLAGS[@]}")
    # -f columns: iterations, latency p50/avg/overall (us), bandwidth avg/overall (MiB/s), rate avg/overall
    pt_rtt=$(awk '{printf "%.2f", 2 * $2}' <<< "$lat")
    tag_rtt=$(awk '{printf "%.2f", 2 * $2}' <<< "$tag")
    pt_pp=$(awk -v b="$bytes" '{printf "%.3f", 2 * b / ($2 * 2) / 1e3}' <<< "$lat")
    pt_bw=$(awk '{printf "%.3f", $6 * 1048576 / 1e9}' <<< "$bw")
    awk -v bytes="$bytes" -v p50="$p50" -v p99="$p99" -v pt_rtt="$pt_rtt" -v tag_rtt="$tag_rtt" -v pp="$pp" -v pt_pp="$pt_pp" \
        -v stream="$stream" -v pt_bw="$pt_bw" -v mc="$mc" -v mcc="$mcc" -v al="$al" -v xn="$xn" -v xs="$xs" 'BEGIN {
      pt_new = pt_rtt - xs + xn
      printf "%9d | %9.1f %9.1f %9.1f %6.2f %9.1f %6.2f | %7.1f %7.1f %8.1f %6.2f | %8.3f %8.3f %6.2f | %8.3f %8.3f %8.3f %6.2f %6.2f | %7.1f %7.1f | %6.1f\n",
        bytes, p50, p99, pt_rtt, p50 / pt_rtt, tag_rtt, p50 / tag_rtt, xn, xs, pt_new, p50 / pt_new, pp, pt_pp, pp / pt_pp,
        stream, 2 * stream, pt_bw, stream / pt_bw, 2 * stream / pt_bw, mc, mcc, al }'
  done
  sed 's/^SERVER /server (all sizes, ping-pong and stream): /' "$TMP/ours.err"
done
echo
echo "ratio (latency) = ours p50 RTT / ucx_perftest ucp_am_lat RTT (target ≤ 1.5 at small sizes);"
echo "tag_rtt = ucx_perftest tag_lat RTT (its receiver copies each message into its own buffer, as ours does);"
echo "xc_new / xc_same = two threads on the two CPUs handing the payload there and back, each copying the other's"
echo "  buffer: rows the other core has just written (as serving moves them) / buffers nobody rewrites (as"
echo "  ucx_perftest's ping-pong reads them: written once, so after the first message they are in the reader's cache);"
echo "pt_new = pt_rtt - xc_same + xc_new: perftest's round trip with its copies costed for new rows; ratio = ours / pt_new;"
echo "pp = ping-pong GB/s, 2·payload/RTT (ours p50, perftest median); ratio = ours / perftest;"
echo "r_1dir / r_2dir = ours streamed payload per direction / both directions over ucp_am_bw (one direction);"
echo "hot_cpy / cold_cpy = one memcpy of the payload between two cache-hot buffers / through 512 MiB of memory;"
echo "allocs = C++ allocations in the client process per ping-pong round trip (the server prints its own per request)."
