#!/usr/bin/env bash
# Packs binaries built here, with the Debian shared libraries they need that a stock CUDA machine
# lacks (CAF, UCX, OpenBLAS's OpenMP build, gfortran, ...), into .device/ for the GPU machine.
#
#   deploy/gpu/pack.sh [gpu|serve]
#
# gpu (default): the GPU tests and benchmarks, for deploy/gpu/run-gpu-checks.sh.
# serve: `switchyard` and `serve_load` laid out as a build folder (.device/build/apps, .device/build/bench)
#        plus UCX's loadable transports, for bench/serve_bench.sh on that machine's cores
#        (see deploy/gpu/run-serve-bench.sh). Both do not fit the carry limit at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build}"
PACK="$ROOT/.device"
WHAT="${1:-gpu}"
rm -rf "$PACK" && mkdir -p "$PACK/lib"
case "$WHAT" in
  gpu)
    mkdir -p "$PACK/bin"
    for b in tests/gpu_tests bench/bench_gpu_moe bench/bench_gpu_nccl; do cp "$BUILD/$b" "$PACK/bin/"; done
    ;;
  serve)
    mkdir -p "$PACK/build/apps" "$PACK/build/bench" "$PACK/lib/ucx"
    cp "$BUILD/apps/switchyard" "$PACK/build/apps/"
    cp "$BUILD/bench/serve_load" "$PACK/build/bench/"
    # UCX loads some transports as modules (cma: single-copy shared memory), which ldd does not list.
    cp -L /usr/lib/x86_64-linux-gnu/ucx/libuct_cma.so.0 "$PACK/lib/ucx/"
    ;;
  *) echo "usage: $0 [gpu|serve]" >&2; exit 2 ;;
esac
# Everything ldd resolves outside the CUDA toolkit and glibc's own core libraries travels.
find "$PACK" -type f -perm -u+x ! -path "$PACK/lib/*" | while read -r b; do
  ldd "$b" | awk '/=>/ {print $3}' | while read -r lib; do
    case "$lib" in
      /usr/local/cuda*|*/libstdc++.so*|*/libgcc_s.so*|*/libc.so*|*/libm.so*|*/libpthread.so*|*/libdl.so*|*/librt.so*|*/ld-linux*) ;;
      *) cp -L "$lib" "$PACK/lib/" ;;
    esac
  done
done
du -sh "$PACK"
