#!/usr/bin/env bash
# Runs every GPU check in one call on a machine with NVIDIA GPUs: the GPU tests (against the CPU
# oracle), transformers' MoE block timing, and the GPU MoE benchmark. Expects binaries built on the
# Debian machine by deploy/gpu/pack.sh in .device/ (binaries + the Debian libraries they need).
#
#   deploy/gpu/run-gpu-checks.sh [OUTDIR]
#
# GPU_STEPS picks steps (default "tests hf bench sweep nccl"), e.g. GPU_STEPS="tests sweep".
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PACK="$ROOT/.device"
OUT="${1:-${OUT:-/tmp/sy-gpu-out}}"
mkdir -p "$OUT"
# The binaries were built elsewhere: point the tests at this checkout's fixtures.
export SY_TEST_DATA="$ROOT/tests/data"
export LD_LIBRARY_PATH="$PACK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
STEPS=" ${GPU_STEPS:-tests hf bench sweep nccl} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
if step tests; then
echo "== gpu_tests"
"$PACK/bin/gpu_tests" --durations yes 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if step hf; then
echo "== transformers MoE block"
PYTHONUNBUFFERED=1 python3 "$ROOT/bench/gpu/hf_moe_block.py" --out "$OUT/hf.json" 2>&1 | tee "$OUT/hf.log" | tail -12
fi
if step bench; then
echo "== bench_gpu_moe"
"$PACK/bin/bench_gpu_moe" --hf-json "$OUT/hf.json" 2>&1 | tee "$OUT/bench_gpu_moe.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== bench_gpu_moe --router-bf16 (a router stored in bf16, as checkpoints hold it: the router GEMM in bf16 pieces)"
"$PACK/bin/bench_gpu_moe" --router-bf16 --tokens 64,512,4096 --modes auto,auto/sgemm 2>&1 | tee "$OUT/bench_gpu_moe_router_bf16.txt" |
  grep -E 'device|roofline|auto'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if step sweep; then
echo "== bench_gpu_moe --gemv-sweep (the GEMV path's tunings, 1-8 tokens)"
"$PACK/bin/bench_gpu_moe" --gemv-sweep --tokens 1,2,4,8 2>&1 | tee "$OUT/bench_gpu_gemv_sweep.txt" | grep -E 'device|roofline|gemv'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if step nccl; then
echo "== bench_gpu_nccl (two GPUs; exits 77 with one)"
"$PACK/bin/bench_gpu_nccl" 2>&1 | tee "$OUT/bench_gpu_nccl.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || status=1
fi
exit $status
