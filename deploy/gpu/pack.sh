#!/usr/bin/env bash
# Packs the GPU binaries built here, with the Debian shared libraries they need that a stock CUDA
# machine lacks (CAF, OpenBLAS's OpenMP build, gfortran, ...), into .device/ for the GPU machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build}"
PACK="$ROOT/.device"
rm -rf "$PACK" && mkdir -p "$PACK/bin" "$PACK/lib"
for b in tests/gpu_tests bench/bench_gpu_moe bench/bench_gpu_nccl; do cp "$BUILD/$b" "$PACK/bin/"; done
# Everything ldd resolves outside the CUDA toolkit and glibc's own core libraries travels.
for b in "$PACK"/bin/*; do
  ldd "$b" | awk '/=>/ {print $3}' | while read -r lib; do
    case "$lib" in
      /usr/local/cuda*|*/libstdc++.so*|*/libgcc_s.so*|*/libc.so*|*/libm.so*|*/libpthread.so*|*/libdl.so*|*/librt.so*|*/ld-linux*) ;;
      *) cp -L "$lib" "$PACK/lib/" ;;
    esac
  done
done
du -sh "$PACK"
