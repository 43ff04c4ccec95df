// Expert-weight transfer between two GPUs of one host: NCCL send/recv of an expert's three bf16
// matrices (the nccl_mover used for replication and migration) next to a plain peer-to-peer
// device copy of the same bytes, measured in the same run. Needs two CUDA devices.
//
//   bench_gpu_nccl [--reps N]
#include "model/cuda/gpu_moe.hpp"
#include "model/cuda/nccl_mover.hpp"
#include "model/cuda/staging.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace gpu = sy::model::cuda;
namespace m = sy::model;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 10;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--reps") reps = std::atoi(argv[i + 1]);
  if (gpu::device_count() < 2) {
    std::printf("SKIPPED: needs 2 CUDA devices, found %d\n", gpu::device_count());
    return 77;
  }
  struct shape {
    const char* name;
    size_t hidden, ffn;
  };
  std::printf("devices: %s | %s\n", gpu::device_description(0).c_str(), gpu::device_description(1).c_str());
  const bool p2p = !gpu::enable_peer_access(0, 1);
  std::printf("peer access: %s\n", p2p ? "enabled" : "not available (copies may stage through the host)");
  auto id = gpu::nccl_mover::new_unique_id();
  if (!id) {
    std::printf("error: %s\n", m::describe(id.error()).c_str());
    return 1;
  }
  std::unique_ptr<gpu::nccl_mover> mv[2];
  caf::error init_err[2];
  {
    std::thread t1([&] {
      auto r = gpu::nccl_mover::make(1, 1, 2, *id, std::chrono::seconds(30));
      if (r) mv[1] = std::move(*r);
      else init_err[1] = r.error();
    });
    auto r = gpu::nccl_mover::make(0, 0, 2, *id, std::chrono::seconds(30));
    if (r) mv[0] = std::move(*r);
    else init_err[0] = r.error();
    t1.join();
  }
  for (int i = 0; i < 2; ++i)
    if (init_err[i]) {
      std::printf("error: rank %d: %s\n", i, m::describe(init_err[i]).c_str());
      return 1;
    }
  std::printf("\n%-22s %10s | %10s %10s | %10s %10s | %7s\n", "expert", "MB", "NCCL ms", "NCCL GB/s", "peer ms",
              "peer GB/s", "ratio");
  for (auto s : {shape{"mixtral-8x7b (4096x14336)", 4096, 14336}, shape{"deepseek-v3 (7168x2048)", 7168, 2048},
                 shape{"qwen3-30b (2048x768)", 2048, 768}}) {
    const size_t sizes[3] = {s.hidden * s.ffn * 2, s.hidden * s.ffn * 2, s.hidden * s.ffn * 2};  // gate, up, down (bf16)
    size_t total = 0;
    void* src[3];
    void* dst[3];
    for (int i = 0; i < 3; ++i) {
      total += sizes[i];
      cudaSetDevice(0);
      cudaMalloc(&src[i], sizes[i]);
      cudaMemset(src[i], 0x5a + i, sizes[i]);
      cudaSetDevice(1);
      cudaMalloc(&dst[i], sizes[i]);
    }
    cudaSetDevice(0);
    cudaDeviceSynchronize();
    std::vector<double> nccl_ms, peer_ms;
    for (int r = 0; r < reps + 2; ++r) {
      caf::error se, re;
      auto t0 = std::chrono::steady_clock::now();
      std::thread rx([&] { re = mv[1]->recv_expert(0, {dst, 3}, {sizes, 3}); });
      se = mv[0]->send_expert(1, {const_cast<const void* const*>(src), 3}, {sizes, 3});
      rx.join();
      const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (se || re) {
        std::printf("error: %s\n", m::describe(se ? se : re).c_str());
        return 1;
      }
      if (r >= 2) nccl_ms.push_back(t);
      t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 3; ++i)
        if (auto e = gpu::copy_peer(0, src[i], 1, dst[i], sizes[i])) {
          std::printf("error: %s\n", m::describe(e).c_str());
          return 1;
        }
      const double tp = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (r >= 2) peer_ms.push_back(tp);
    }
    const double a = median(nccl_ms), b = median(peer_ms);
    std::printf("%-22s %10.1f | %10.3f %10.1f | %10.3f %10.1f | %6.2fx\n", s.name, total / 1e6, a, total / (a * 1e-3) * 1e-9,
                b, total / (b * 1e-3) * 1e-9, b / a);
    for (int i = 0; i < 3; ++i) {
      cudaSetDevice(0);
      cudaFree(src[i]);
      cudaSetDevice(1);
      cudaFree(dst[i]);
    }
  }
  std::printf("(median of %d after 2 warm-up transfers; ratio = peer-copy time / NCCL time, above 1 = NCCL faster)\n", reps);
  return 0;
}
