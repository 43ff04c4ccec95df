#include "model/cuda/gpu_moe.hpp"

#include "model/cuda/moe_gemm.hpp"
#include "model/cuda/pdl.cuh"

#include "model/error.hpp"

#include <cublas_v2.h>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace sy::model::cuda {

namespace {

caf::error cuda_fail(const char* what, cudaError_t e) {
  return make_error(model_errc::io_error, std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
caf::error blas_fail(const char* what, cublasStatus_t s) {
  return make_error(model_errc::io_error, std::string("cuBLAS: ") + what + ": " + cublasGetStatusString(s));
}

#define SY_CU(call)                                        \
  do {                                                     \
    cudaError_t sy_e_ = (call);                            \
    if (sy_e_ != cudaSuccess) return cuda_fail(#call, sy_e_); \
  } while (0)
#define SY_CUBLAS(call)                                              \
  do {                                                               \
    cublasStatus_t sy_s_ = (call);                                   \
    if (sy_s_ != CUBLAS_STATUS_SUCCESS) return blas_fail(#call, sy_s_); \
  } while (0)
#define SY_TRY(expr)          \
  do {                        \
    if (auto sy_err_ = (expr)) \
      return sy_err_;         \
  } while (0)

using bf16 = __nv_bfloat16;

/// Device memory that grows on demand.
struct dbuf {
  void* p = nullptr;
  size_t bytes = 0;
  dbuf() = default;
  dbuf(const dbuf&) = delete;
  dbuf& operator=(const dbuf&) = delete;
  ~dbuf() {
    if (p) cudaFree(p);
  }
  caf::error reserve(size_t n) {
    if (n <= bytes) return {};
    // Work queued earlier (a forward still running on its stream) may use the old buffer: wait
    // for the device before freeing it rather than count on cudaFree's own synchronisation.
    // Growth is rare (the first steps of each size).
    if (p) {
      SY_CU(cudaDeviceSynchronize());
      cudaFree(p);
    }
    p = nullptr;
    bytes = 0;
    SY_CU(cudaMalloc(&p, std::max<size_t>(n, 256)));
    bytes = std::max<size_t>(n, 256);
    return {};
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

/// Pinned host memory that grows on demand.
struct hbuf {
  void* p = nullptr;
  size_t bytes = 0;
  hbuf() = default;
  hbuf(const hbuf&) = delete;
  hbuf& operator=(const hbuf&) = delete;
  ~hbuf() {
    if (p) cudaFreeHost(p);
  }
  caf::error reserve(size_t n) {
    if (n <= bytes) return {};
    if (p) cudaFreeHost(p);
    p = nullptr;
    bytes = 0;
    SY_CU(cudaHostAlloc(&p, std::max<size_t>(n, 256), cudaHostAllocDefault));
    bytes = std::max<size_t>(n, 256);
    return {};
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

unsigned blocks_for(int64_t n, unsigned threads = 256) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
}

// ---- kernels ----

// Eight elements per thread where lengths and pointers allow 16-byte accesses (n % 8 == 0 and
// every buffer 16-byte aligned), one otherwise.
__device__ __forceinline__ uint4 pack8_bf16(const float (&v)[8]) {
  uint4 u;
  unsigned* w = &u.x;
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 b = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    w[j] = *reinterpret_cast<const unsigned*>(&b);
  }
  return u;
}
__device__ __forceinline__ void unpack8_bf16(uint4 u, float (&v)[8]) {
  const unsigned* w = &u.x;
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}
__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__global__ void f32_to_bf16_kernel(const float* in, bf16* out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (n % 8 == 0 && aligned16(in) && aligned16(out)) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n / 8; i += stride) {
      float v[8];
      load8(in + i * 8, v);
      reinterpret_cast<uint4*>(out)[i] = pack8_bf16(v);
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) out[i] = __float2bfloat16(in[i]);
}

/// x (f32, n values) as three bf16 pieces, out[0 .. n) = hi, out[n .. 2n) = mid, out[2n .. 3n) = lo,
/// hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid) (each difference exact in f32), so
/// hi + mid + lo = x for every normal x. hi is what f32_to_bf16_kernel writes. (Also the host's
/// split of the router's weights.)
__host__ __device__ __forceinline__ void split3(float x, bf16& hi, bf16& mid, bf16& lo) {
  hi = __float2bfloat16_rn(x);
  const float r = x - __bfloat162float(hi);
  mid = __float2bfloat16_rn(r);
  lo = __float2bfloat16_rn(r - __bfloat162float(mid));
}
/// Eight values' split3 pieces, eight bf16 of each in a 16-byte word: p[0] hi, p[1] mid, p[2] lo.
__device__ __forceinline__ void split3x8(const float (&v)[8], uint4 (&p)[3]) {
  float piece[3][8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    bf16 a, b, c;
    split3(v[j], a, b, c);
    piece[0][j] = __bfloat162float(a), piece[1][j] = __bfloat162float(b), piece[2][j] = __bfloat162float(c);
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) p[k] = pack8_bf16(piece[k]);  // exact: each is a bf16 value already
}
__global__ void split3_kernel(const float* in, bf16* out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (n % 8 == 0 && aligned16(in) && aligned16(out)) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n / 8; i += stride) {
      float v[8];
      load8(in + i * 8, v);
      uint4 p[3];
      split3x8(v, p);
#pragma unroll
      for (int k = 0; k < 3; ++k) reinterpret_cast<uint4*>(out + k * n)[i] = p[k];
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) split3(in[i], out[i], out[n + i], out[2 * n + i]);
}

// ---- the router GEMM in one pass (bf16 router weights) ----
//
// logits = x · rᵀ with x f32 [t, H] and r holding bf16 values [E, H], on the tensor cores: each x
// value split into its three bf16 pieces (split3: hi + mid + lo = x exactly), the three products
// (each exact in f32) accumulated in f32 (mma.sync m16n8k16), x read once and its hi piece (the
// fused kernels' bf16 copy of the tokens) written on the way: the pieces never go through memory.
//
// Block (i, s): router_pass_tokens tokens (two m16 tiles) × every expert, one warp per 32 experts
// (four n8 tiles), over the s-th of gridDim.y ranges of H's 64-wide chunks; its sums go to logits
// slice s ([gridDim.y][t, E]), which the gating adds. A chunk's x rows come through a cp.async ring
// of router_pass_stages stages; the block splits each chunk into its three pieces in shared memory
// (double-buffered: the next chunk's split overlaps this one's products); each warp reads its
// router rows from global memory (L2: every block reads them).
//
// The dot products' k order is permuted alike for A and B (a sum does not care): in k32 half j2
// and k16 step j, thread q of a quad (lane % 4) holds k = 32·j2 + 8·q + 4·j .. + 3 as its fragment
// k {2q, 2q + 1, 2q + 8, 2q + 9}, so each A row and B column comes in one 16-byte piece per k32.
constexpr int router_pass_tokens = 32;
constexpr int router_pass_chunk = 64;
constexpr int router_pass_stages = 4;
constexpr int router_pass_max_experts = 256;
constexpr int router_pass_max_splits = 16;
constexpr int router_pass_x_bytes = router_pass_tokens * router_pass_chunk * 4;      // 8 KiB a stage
constexpr int router_pass_piece_bytes = router_pass_tokens * router_pass_chunk * 2;  // 4 KiB a piece
constexpr int router_pass_smem = router_pass_stages * router_pass_x_bytes + 2 * 3 * router_pass_piece_bytes;

__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__global__ void router_pass_kernel(const float* __restrict__ x, int64_t t, int h, const bf16* __restrict__ r, int experts,
                                   float* __restrict__ logits, bf16* __restrict__ x_hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  pdl_trigger();  // the gating may launch (and wait) once every block of this one runs
  extern __shared__ __align__(16) unsigned char rp_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t tok0 = int64_t(blockIdx.x) * router_pass_tokens;
  const int chunks = h / router_pass_chunk;
  const int cb = static_cast<int>(int64_t(chunks) * blockIdx.y / gridDim.y);
  const int ce = static_cast<int>(int64_t(chunks) * (blockIdx.y + 1) / gridDim.y);
  // x stages: rows of 16 units of 16 bytes, unit u at u ^ (u / 8 & 1) (the split's quarter warps
  // read units 0, 2, .. 14 or 1, 3, .. 15 of a row). Pieces: rows of 8 units (8 bf16 each), unit u
  // of row i at u ^ 4·(i & 1) (the products' quarter warps read one unit of two rows). Each
  // quarter warp's 16-byte accesses then cover all 32 banks.
  auto xs = [&](int c) { return reinterpret_cast<float*>(rp_smem + (c % router_pass_stages) * router_pass_x_bytes); };
  auto pieces = [&](int c, int pc) {
    return reinterpret_cast<bf16*>(rp_smem + router_pass_stages * router_pass_x_bytes +
                                   ((c & 1) * 3 + pc) * router_pass_piece_bytes);
  };
  auto load = [&](int c) {
    if (c < ce) {
      float* xd = xs(c);
      for (int i = tid; i < router_pass_tokens * 16; i += blockDim.x) {
        const int row = i >> 4, u = i & 15;
        const bool ok = tok0 + row < t;
        cp_async16_zfill(xd + row * router_pass_chunk + ((u ^ (u >> 3 & 1)) << 2),
                         x + (ok ? (tok0 + row) * h + c * router_pass_chunk + u * 4 : 0), ok);
      }
    }
    cp_async_commit();  // one group per chunk slot, empty past the range
  };
  // Chunk c's x, landed, into its three pieces (and its hi piece out to x_hi).
  auto split = [&](int c) {
    const float* xc = xs(c);
    for (int i = tid; i < router_pass_tokens * 8; i += blockDim.x) {
      const int row = i >> 3, u8 = i & 7;
      const int ua = 2 * u8, ub = 2 * u8 + 1;
      const float4 a = *reinterpret_cast<const float4*>(xc + row * router_pass_chunk + ((ua ^ (ua >> 3 & 1)) << 2));
      const float4 b = *reinterpret_cast<const float4*>(xc + row * router_pass_chunk + ((ub ^ (ub >> 3 & 1)) << 2));
      const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      uint4 p[3];
      split3x8(v, p);
      const int at = row * router_pass_chunk + ((u8 ^ ((row & 1) << 2)) << 3);
#pragma unroll
      for (int k = 0; k < 3; ++k) *reinterpret_cast<uint4*>(pieces(c, k) + at) = p[k];
      if (tok0 + row < t) reinterpret_cast<uint4*>(x_hi + (tok0 + row) * h + c * router_pass_chunk)[u8] = p[0];
    }
  };
  for (int c = cb; c < cb + router_pass_stages; ++c) load(c);
  cp_async_wait<router_pass_stages - 1>();
  __syncthreads();
  if (cb < ce) split(cb);
  float acc[2][4][4] = {};
  for (int c = cb; c < ce; ++c) {
    cp_async_wait<router_pass_stages - 2>();  // chunk c + 1 landed (this thread's copies)
    // Everyone's copies of chunk c + 1 and split of chunk c are visible; chunk c's stage (split)
    // and the other piece buffer (chunk c - 1's products) are free.
    __syncthreads();
    load(c + router_pass_stages);
    // This warp's router values for chunk c: k = 32·j2 + 8q .. + 7 of expert warp·32 + nt·8 + g.
    uint4 b[2][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int n = warp * 32 + nt * 8 + g;
#pragma unroll
      for (int j2 = 0; j2 < 2; ++j2)
        b[j2][nt] = n < experts ? __ldg(reinterpret_cast<const uint4*>(r + int64_t(n) * h + c * router_pass_chunk + 32 * j2 + 8 * q))
                                : make_uint4(0, 0, 0, 0);
    }
    if (c + 1 < ce) split(c + 1);
#pragma unroll
    for (int j2 = 0; j2 < 2; ++j2)
#pragma unroll
      for (int pc = 2; pc >= 0; --pc) {  // the smallest piece first
        const bf16* pp = pieces(c, pc);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int r0 = mt * 16 + g, r1 = r0 + 8;
          const uint4 a0 = *reinterpret_cast<const uint4*>(pp + r0 * router_pass_chunk + (((4 * j2 + q) ^ ((r0 & 1) << 2)) << 3));
          const uint4 a1 = *reinterpret_cast<const uint4*>(pp + r1 * router_pass_chunk + (((4 * j2 + q) ^ ((r1 & 1) << 2)) << 3));
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const unsigned f0 = j ? a0.z : a0.x, f1 = j ? a1.z : a1.x, f2 = j ? a0.w : a0.y, f3 = j ? a1.w : a1.y;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              const unsigned b0 = j ? b[j2][nt].z : b[j2][nt].x, b1 = j ? b[j2][nt].w : b[j2][nt].y;
              asm volatile(
                  "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                  "{%0, %1, %2, %3};"
                  : "+f"(acc[mt][nt][0]), "+f"(acc[mt][nt][1]), "+f"(acc[mt][nt][2]), "+f"(acc[mt][nt][3])
                  : "r"(f0), "r"(f1), "r"(f2), "r"(f3), "r"(b0), "r"(b1));
            }
          }
        }
      }
  }
  cp_async_wait<0>();
  // acc[mt][nt]: rows mt·16 + g (+ 8 for the last two), experts warp·32 + nt·8 + 2q (+ 1).
  float* out = logits + int64_t(blockIdx.y) * t * experts;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = tok0 + mt * 16 + g + 8 * half;
      if (row >= t) continue;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = warp * 32 + nt * 8 + 2 * q;
        if (n < experts) out[row * experts + n] = acc[mt][nt][2 * half];
        if (n + 1 < experts) out[row * experts + n + 1] = acc[mt][nt][2 * half + 1];
      }
    }
#endif
}

__global__ void bf16_to_f32_kernel(const bf16* in, float* out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (n % 8 == 0 && aligned16(in) && aligned16(out)) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n / 8; i += stride) {
      float v[8];
      unpack8_bf16(reinterpret_cast<const uint4*>(in)[i], v);
      store8(out + i * 8, v);
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) out[i] = __bfloat162float(in[i]);
}

/// Threads the two conversion kernels want for n elements (eight per thread when n % 8 == 0).
int64_t convert_threads(int64_t n) { return n % 8 == 0 ? n / 8 : n; }

/// Deterministic pseudo-random fill in [-scale, scale) for benchmarks (never time on zeros).
__global__ void fill_kernel(bf16* out, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t z = seed + static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    out[i] = __float2bfloat16((static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2 - 1) * scale);
  }
}

/// One piece of a pure weight read (the benchmarks' same-bytes baseline): `n` 16-byte words at `p`.
struct read_chunk {
  const uint4* p;
  int n;
};
/// 16-byte words per chunk: 64 KiB, so a chunk is a few iterations of a block of 256 threads.
constexpr int read_chunk_words = 4096;

/// Reads every word of `chunks` chunks once (streaming loads, four in flight per thread) and folds
/// them into a value that is written only if it hits an unlikely constant, so no load is dead code.
__global__ void __launch_bounds__(256) read_chunks_kernel(const read_chunk* __restrict__ c, int chunks, unsigned* sink) {
  unsigned acc = 0;
  for (int k = blockIdx.x; k < chunks; k += gridDim.x) {
    const read_chunk ch = c[k];
    for (int i = threadIdx.x; i < ch.n; i += 4 * 256) {
      uint4 v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = i + j * 256 < ch.n ? __ldcs(ch.p + i + j * 256) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  }
  if (acc == 0x9e3779b9u) atomicAdd(sink, 1u);
}

constexpr int max_experts = 512;
constexpr int max_groups = 64;

struct gate_params {
  int experts, k, n_group, topk_group;
  int sigmoid, method, norm, scale_only_unnormalised;
  float norm_eps, scale;
};

__global__ void count_kernel(const int* idx, int64_t n, const int* slot, int* counts) {
  pdl_trigger();
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (slot[idx[i]] >= 0) atomicAdd(&counts[idx[i]], 1);
}

struct plan_sums {
  int rows, whole, odd, active;
};
struct plan_add {
  __device__ plan_sums operator()(const plan_sums& a, const plan_sums& b) const {
    return {a.rows + b.rows, a.whole + b.whole, a.odd + b.odd, a.active + b.active};
  }
};

/// The fused path's dispatch without the host (one block): expert i's rows start at offsets[i]
/// (packed, in id order, as the host's plan), its tiles of up to moe_tile_rows rows go into
/// `tiles` in the layout moe_tile_list makes for `cluster` (moe_gemm.hpp), their number in
/// *tile_count; the experts with rows in act[0 .. *n_act); `fill` zeroed for the scatter.
__global__ void __launch_bounds__(max_experts) plan_kernel(const int* counts, int experts, int cluster, int* offsets,
                                                           int* fill, moe_tile* tiles, int* tile_count, int* n_act,
                                                           int* act) {
  using scan = cub::BlockScan<plan_sums, max_experts>;
  __shared__ typename scan::TempStorage tmp;
  __shared__ moe_tile last[max_experts];  // the last tile of the j-th expert with an odd tile count
  pdl_trigger();
  pdl_wait();
  const int i = static_cast<int>(threadIdx.x);
  const int c = i < experts ? counts[i] : 0;
  const moe_tile_place pl = moe_expert_place(cluster, c);
  const plan_sums mine{c, pl.whole, pl.odd, c > 0 ? 1 : 0};
  plan_sums before, total;
  scan(tmp).ExclusiveScan(mine, before, plan_sums{0, 0, 0, 0}, plan_add{}, total);
  if (i < experts) {
    offsets[i] = before.rows;
    fill[i] = 0;
  }
  if (c > 0) act[before.active] = i;
  const int start = moe_run_start(before.whole, before.odd);
  for (int m = 0; m < pl.whole; ++m) tiles[start + m] = moe_expert_tile(i, before.rows, c, m);
  if (pl.odd) last[before.odd] = moe_expert_tile(i, before.rows, c, pl.whole);
  __syncthreads();
  if (pl.odd) {
    if (before.odd % 2 == 1) {  // the mixed pair with the previous odd expert, after this run
      tiles[start + pl.whole] = last[before.odd - 1];
      tiles[start + pl.whole + 1] = last[before.odd];
    } else if (before.odd == total.odd - 1) {  // the last odd expert, unpaired: ends the list
      const int n = moe_list_length(total.whole, total.odd);
      tiles[n - 2] = last[before.odd];
      tiles[n - 1] = moe_expert_tile(i, before.rows, c, pl.whole + 1);
    }
  }
  if (i == 0) {
    *tile_count = moe_list_length(total.whole, total.odd);
    *n_act = total.active;
  }
}

/// Routing pair i goes to row pos[i] of the expert-sorted rows (-1: expert not held here); with
/// `row_tok`, that row's token (i / k) is noted there.
__global__ void scatter_kernel(const int* idx, int64_t n, const int* slot, const int* offsets, int* fill, int* pos,
                               int* row_tok, int k) {
  pdl_trigger();
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int e = idx[i];
    const int p = slot[e] >= 0 ? offsets[e] + atomicAdd(&fill[e], 1) : -1;
    pos[i] = p;
    if (row_tok && p >= 0) row_tok[p] = static_cast<int>(i / k);
  }
}

/// Row i of the routing (token i / k) goes to row pos[i] of the expert-sorted input, as bf16.
__global__ void gather_kernel(const float* x, int64_t h, const int* pos, int k, bf16* xs) {
  const int64_t i = blockIdx.x;
  const int p = pos[i];
  if (p < 0) return;
  const float* src = x + (i / k) * h;
  bf16* dst = xs + int64_t(p) * h;
  if (h % 8 == 0 && aligned16(x) && aligned16(xs)) {
    for (int64_t c = threadIdx.x; c < h / 8; c += blockDim.x) {
      float v[8];
      load8(src + c * 8, v);
      reinterpret_cast<uint4*>(dst)[c] = pack8_bf16(v);
    }
    return;
  }
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) dst[c] = __float2bfloat16(src[c]);
}

/// h = silu(gate) · up over rows of [gate | up] (bf16 in, fp32 math, bf16 out); eight columns per
/// thread when f % 8 == 0 (launch with rows · f / 8 threads), one otherwise (rows · f).
__global__ void swiglu_kernel(const bf16* gu, int64_t rows, int64_t f, bf16* out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (f % 8 == 0 && aligned16(gu) && aligned16(out)) {
    const int64_t f8 = f / 8, n8 = rows * f8;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += stride) {
      const int64_t r = i / f8, c = i - r * f8;
      const uint4* row = reinterpret_cast<const uint4*>(gu + r * 2 * f);
      float g[8], u[8];
      unpack8_bf16(row[c], g);
      unpack8_bf16(row[f8 + c], u);
      for (int j = 0; j < 8; ++j) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
      reinterpret_cast<uint4*>(out)[i] = pack8_bf16(g);
    }
    return;
  }
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / f, c = i - r * f;
    const float g = __bfloat162float(gu[r * 2 * f + c]), u = __bfloat162float(gu[r * 2 * f + f + c]);
    out[i] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
  }
}

/// Threads swiglu_kernel wants for rows × f.
int64_t swiglu_threads(int64_t rows, int64_t f) { return f % 8 == 0 ? rows * f / 8 : rows * f; }

/// Launches `kernel` on `stream`, with programmatic dependent launch when `pdl` is set.
template <class... P, class... A>
cudaError_t launch_k(bool pdl, void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(std::forward<A>(args))...);
}

__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

/// y[t] = Σ_j w[t, j] · yo[pos[t, j]] (rows of absent experts skipped), fp32 accumulation.
/// Grid (tokens, column blocks): one output element per thread; the token's rows and weights are
/// read once per block.
template <class T>
__global__ void combine_kernel(const T* yo, const int* pos, const float* w, int k, int64_t h, float* y) {
  constexpr int max_k = 32;
  __shared__ int sp[max_k];
  __shared__ float sw[max_k];
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  if (threadIdx.x < k && threadIdx.x < max_k) {
    sp[threadIdx.x] = pos[t * k + threadIdx.x];
    sw[threadIdx.x] = w[t * k + threadIdx.x];
  }
  __syncthreads();
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (c >= h) return;
  float acc = 0.0f;
  for (int j = 0; j < k; ++j)
    if (sp[j] >= 0) acc += sw[j] * to_f32(yo[int64_t(sp[j]) * h + c]);
  y[t * h + c] = acc;
}

/// combine_kernel over bf16 expert outputs, eight columns per thread (h % 8 == 0, yo and y 16-byte
/// aligned): grid (tokens,
/// column blocks of 8 · blockDim.x).
__global__ void combine8_kernel(const bf16* yo, const int* pos, const float* w, int k, int64_t h, float* y) {
  constexpr int max_k = 32;
  __shared__ int sp[max_k];
  __shared__ float sw[max_k];
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  if (threadIdx.x < k && threadIdx.x < max_k) {
    sp[threadIdx.x] = pos[t * k + threadIdx.x];
    sw[threadIdx.x] = w[t * k + threadIdx.x];
  }
  __syncthreads();
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;  // in units of 8 columns
  if (c >= h / 8) return;
  float acc[8] = {};
  for (int j = 0; j < k; ++j) {
    if (sp[j] < 0) continue;
    float v[8];
    unpack8_bf16(reinterpret_cast<const uint4*>(yo + int64_t(sp[j]) * h)[c], v);
    for (int q = 0; q < 8; ++q) acc[q] += sw[j] * v[q];
  }
  store8(y + t * h + c * 8, acc);
}

// ---- the GEMV path: up to gemv_max_rows rows per expert, every expert in one launch ----

/// Work list of a GEMV launch, in device memory: `n_act` experts; expert j is `act[j]` and owns
/// rows [start[j], start[j] + cnt[j]); row r reads input row `row_tok[r]`.
struct gemv_work {
  const int* n_act;
  const int* act;
  const int* start;
  const int* cnt;
  const int* row_tok;
};

/// Most (token, expert) pairs the one-block routing kernel holds.
constexpr int gemv_max_pairs = 256;
constexpr int gemv_warps = 8;  // warps per block of the GEMV kernels
/// Blocks per SM the GEMV kernels are compiled for at R rows: left to the compiler up to 4 rows; at
/// 8, capped at 128 registers (two blocks per SM), where the uncapped kernels took 205-255
/// registers and so ran one block (8 warps) per SM.
constexpr int gemv_min_blocks(int r) { return r >= 8 ? 2 : 1; }

__device__ __forceinline__ void bf16x8(const uint4& v, float (&f)[8]) {
  const auto* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(p[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

/// A weight load of the GEMV kernels: streaming (evict-first, `ld.global.cs`), since each weight
/// byte is read once per step; measured on an H200 against `__ldg` and an L2::256B-prefetch
/// non-coherent load (docs/benchmarks.md, 2026-12-03): 10% faster at 8 tokens of Qwen3.
__device__ __forceinline__ uint4 load_weights(const uint4* p) { return __ldcs(p); }

/// acc[q][r] = this lane's part of Σ_c W_q[c] · X_r[c] over rows of length `len` (a multiple of 8),
/// for the first `cnt` of R ≥ cnt input rows (0 for the others; R is a compile-time bound, so the
/// accumulators stay in registers and a one-row step keeps the kernel small enough for high
/// occupancy): each lane streams 16-byte pieces of the warp's NW weight rows (read once: the
/// bandwidth-bound part) and reuses each piece for every input row. Inputs are f32 rows (L1/L2-
/// resident). The sums over the warp are `warp_sum_spread`'s.
template <int NW, int R>
__device__ __forceinline__ void warp_dots(const bf16* const (&w)[NW], const float* const (&x)[R], int cnt,
                                          int len, float (&acc)[NW][R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int q = 0; q < NW; ++q)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[q][r] = 0.0f;
#pragma unroll(R <= 2 ? 4 : 2)
  for (int c = lane * 8; c < len; c += 256) {
    uint4 raw[NW];
#pragma unroll
    for (int q = 0; q < NW; ++q) raw[q] = load_weights(reinterpret_cast<const uint4*>(w[q] + c));
    float wf[NW][8];
#pragma unroll
    for (int q = 0; q < NW; ++q) bf16x8(raw[q], wf[q]);
    // Every load of the iteration is issued before the arithmetic that waits for it.
    float4 xa[R], xb[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < cnt) {
        xa[r] = __ldg(reinterpret_cast<const float4*>(x[r] + c));
        xb[r] = __ldg(reinterpret_cast<const float4*>(x[r] + c + 4));
      }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= cnt) break;
      const float4 a = xa[r], b = xb[r];
#pragma unroll
      for (int q = 0; q < NW; ++q)
        acc[q][r] += wf[q][0] * a.x + wf[q][1] * a.y + wf[q][2] * a.z + wf[q][3] * a.w + wf[q][4] * b.x +
                     wf[q][5] * b.y + wf[q][6] * b.z + wf[q][7] * b.w;
    }
  }
}

/// One step of `warp_sum_spread` at lane offset O, with N values per lane still unsummed.
template <int N, int O, int NW, int R>
__device__ __forceinline__ void spread_step(float (&v)[NW][R], int lane, int& base) {
  if constexpr (O > 0) {
    if constexpr (N > 1) {
      // The lanes with bit O set keep the upper half of the values, the others the lower half;
      // each adds its partner's copy of the half it keeps.
      constexpr int half = N / 2;
      const bool hi = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < half; ++i) {
        float& lo = v[i / R][i % R];
        const float up = v[(i + half) / R][(i + half) % R];
        const float send = hi ? lo : up;
        lo = (hi ? up : lo) + __shfl_xor_sync(0xffffffffu, send, O);
      }
      if (hi) base += half;
      spread_step<half, O / 2>(v, lane, base);
    } else {
      v[0][0] += __shfl_xor_sync(0xffffffffu, v[0][0], O);
      spread_step<1, O / 2>(v, lane, base);
    }
  }
}

/// Sums every one of the V = NW·R values (index q·R + r) over the warp, leaving the sums spread
/// over the lanes: a lane ends with S = max(V / 32, 1) sums, in v's first S places (flat order),
/// of the values base … base + S − 1, and returns its base. Each step halves what a lane holds, so
/// it takes about V + 5 shuffles where summing each value alone takes 5·V. Below 32 values, the
/// 32 / V lanes that differ only in their lowest bits hold the same sums. The lanes with bit 16
/// set hold the upper half (base ≥ V / 2).
template <int NW, int R>
__device__ __forceinline__ int warp_sum_spread(float (&v)[NW][R]) {
  int base = 0;
  spread_step<NW * R, 16>(v, threadIdx.x & 31, base);
  return base;
}

/// How many sums each lane holds after `warp_sum_spread` of V values.
template <int V>
inline constexpr int spread_sums = V >= 32 ? V / 32 : 1;

/// Whether this lane writes its sums after `warp_sum_spread` of V values: one lane per sum.
template <int V>
__device__ __forceinline__ bool spread_writer() {
  if constexpr (V >= 32) return true;
  else return (threadIdx.x & (32 / V - 1)) == 0;
}

/// hmid[row, c] = silu(gate_c · x_row) · (up_c · x_row) for P = NW/2 consecutive columns c from c0
/// (gate rows c of the expert's [2F, H] gate_up W, up rows F + c), for the expert's `cnt` ≤ R rows
/// starting at work-list row r0.
template <int NW, int R>
__device__ __forceinline__ void gate_up_body(const float* __restrict__ x, int h, int f, const bf16* W, const gemv_work& wk,
                                             int r0, int cnt, int c0, float* __restrict__ hmid) {
  constexpr int P = NW / 2;
  const bf16* rows[NW];
#pragma unroll
  for (int q = 0; q < P; ++q) {
    const int c = min(c0 + q, f - 1);
    rows[q] = W + int64_t(c) * h;
    rows[P + q] = W + int64_t(f + c) * h;
  }
  const float* xs[R];
#pragma unroll
  for (int r = 0; r < R; ++r) xs[r] = x + int64_t(wk.row_tok[r0 + min(r, cnt - 1)]) * h;
  float acc[NW][R];
  warp_dots<NW, R>(rows, xs, cnt, h, acc);
  // Gate sums (q < P) land on the lanes without bit 16, each up sum on the lane across bit 16.
  constexpr int V = NW * R, S = spread_sums<V>;
  const int base = warp_sum_spread(acc);
  float up[S];
#pragma unroll
  for (int j = 0; j < S; ++j) up[j] = __shfl_xor_sync(0xffffffffu, acc[j / R][j % R], 16);
  if ((threadIdx.x & 16) != 0 || !spread_writer<V>()) return;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const int i = base + j, q = i / R, r = i % R;
    if (r < cnt && c0 + q < f) {
      const float g = acc[j / R][j % R];
      hmid[int64_t(r0 + r) * f + c0 + q] = g / (1.0f + expf(-g)) * up[j];
    }
  }
}

/// y[row, c] = down_c · hmid_row for NW consecutive output columns from c0, `cnt` ≤ R rows from r0.
template <int NW, int R>
__device__ __forceinline__ void down_body(const float* __restrict__ hmid, int h, int f, const bf16* W, int r0, int cnt,
                                          int c0, float* __restrict__ y) {
  const bf16* rows[NW];
#pragma unroll
  for (int q = 0; q < NW; ++q) rows[q] = W + int64_t(min(c0 + q, h - 1)) * f;
  const float* xs[R];
#pragma unroll
  for (int r = 0; r < R; ++r) xs[r] = hmid + int64_t(r0 + min(r, cnt - 1)) * f;
  float acc[NW][R];
  warp_dots<NW, R>(rows, xs, cnt, f, acc);
  constexpr int V = NW * R, S = spread_sums<V>;
  const int base = warp_sum_spread(acc);
  if (!spread_writer<V>()) return;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const int i = base + j, q = i / R, r = i % R;
    if (r < cnt && c0 + q < h) y[int64_t(r0 + r) * h + c0 + q] = acc[j / R][j % R];
  }
}

/// Runs `body.template operator()<R'>()` for the smallest R' in {1, 2, 4, R} that holds `cnt` rows
/// when `split` (the expert's own row count picks the unrolling: in a step of 8 tokens over 128
/// experts most experts get one or two rows), else for R.
template <int R, class Body>
__device__ __forceinline__ void by_rows(bool split, int cnt, Body&& body) {
  if constexpr (R > 1) {
    if (split && cnt <= 1) return body.template operator()<1>();
  }
  if constexpr (R > 2) {
    if (split && cnt <= 2) return body.template operator()<2>();
  }
  if constexpr (R > 4) {
    if (split && cnt <= 4) return body.template operator()<4>();
  }
  body.template operator()<R>();
}

/// The gate_up GEMV of every expert on the work list in one launch: blockIdx.y = the work list's
/// expert, each warp NW/2 output columns.
template <int NW, int R>
__global__ void __launch_bounds__(gemv_warps * 32, gemv_min_blocks(R)) gemv_gate_up_kernel(const float* __restrict__ x, int h, int f,
                                                                       const bf16* const* __restrict__ tab,
                                                                       gemv_work wk, float* __restrict__ hmid, bool split) {
  constexpr int P = NW / 2;
  pdl_trigger();
  pdl_wait();
  const int j = blockIdx.y;
  if (j >= *wk.n_act) return;
  const int c0 = (blockIdx.x * gemv_warps + (threadIdx.x >> 5)) * P;
  if (c0 >= f) return;
  const int r0 = wk.start[j], cnt = wk.cnt[j];
  const bf16* W = tab[wk.act[j]];
  by_rows<R>(split, cnt, [&]<int Q>() { gate_up_body<NW, Q>(x, h, f, W, wk, r0, cnt, c0, hmid); });
}

/// The down GEMV of every expert on the work list in one launch, NW output columns per warp.
template <int NW, int R>
__global__ void __launch_bounds__(gemv_warps * 32, gemv_min_blocks(R)) gemv_down_kernel(const float* __restrict__ hmid, int h, int f,
                                                                    const bf16* const* __restrict__ tab, gemv_work wk,
                                                                    float* __restrict__ y, bool split) {
  pdl_trigger();
  pdl_wait();
  const int j = blockIdx.y;
  if (j >= *wk.n_act) return;
  const int c0 = (blockIdx.x * gemv_warps + (threadIdx.x >> 5)) * NW;
  if (c0 >= h) return;
  const int r0 = wk.start[j], cnt = wk.cnt[j];
  const bf16* W = tab[wk.act[j]];
  by_rows<R>(split, cnt, [&]<int Q>() { down_body<NW, Q>(hmid, h, f, W, r0, cnt, c0, y); });
}

/// An unsigned key that orders as the float does (-0 as +0, a NaN below everything), for
/// reductions over unsigned values.
__device__ __forceinline__ unsigned choice_key(float v) {
  if (v != v) return 0u;
  const unsigned b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/// The largest (Max) or smallest of the warp's 32 values: `redux.sync` from sm_80, shuffles before.
template <bool Max>
__device__ __forceinline__ unsigned warp_extreme(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return Max ? __reduce_max_sync(0xffffffffu, v) : __reduce_min_sync(0xffffffffu, v);
#else
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned w = __shfl_xor_sync(0xffffffffu, v, o);
    v = Max ? max(v, w) : min(v, w);
  }
  return v;
#endif
}

/// The top k of one token's `choice` over E ≤ 32 · PL experts by one warp, in rank order (the
/// largest first, the lower id among equals), into idx[0 .. k) with w[j] = score[idx[j]]; returns
/// the sum of those scores, added in rank order. Lane l holds experts l, l + 32, ... in registers,
/// sorted once by (key, id); each round one reduction finds the largest head over the lanes, a
/// second the lowest id among the heads that hold it, and that lane drops its head: no lane looks
/// over its experts again.
template <int PL>
__device__ __forceinline__ double top_k_lanes(const float* choice, const float* score, int E, int k, int lane, int* idx,
                                              float* w) {
  unsigned key[PL], id[PL];  // past E: key 0 and id ~0, after every expert (a NaN choice is key 0 too)
#pragma unroll
  for (int q = 0; q < PL; ++q) {
    const int i = lane + 32 * q;
    key[q] = i < E ? choice_key(choice[i]) : 0u;
    id[q] = i < E ? static_cast<unsigned>(i) : 0xffffffffu;
  }
  // Insertion sort, largest key first. The ids arrive ascending and only a strictly larger key
  // moves up, so equal keys keep the lower id first.
#pragma unroll
  for (int a = 1; a < PL; ++a)
#pragma unroll
    for (int b = a; b > 0; --b)
      if (key[b] > key[b - 1]) {
        const unsigned kk = key[b], ii = id[b];
        key[b] = key[b - 1];
        id[b] = id[b - 1];
        key[b - 1] = kk;
        id[b - 1] = ii;
      }
  double sum = 0;
  for (int j = 0; j < k; ++j) {
    const unsigned top = warp_extreme<true>(key[0]);
    const int arg = static_cast<int>(warp_extreme<false>(key[0] == top ? id[0] : 0xffffffffu));
    sum += score[arg];
    if (lane == 0) {
      idx[j] = arg;
      w[j] = score[arg];
    }
    if (lane == (arg & 31)) {  // the winner's lane drops it
#pragma unroll
      for (int q = 0; q + 1 < PL; ++q) {
        key[q] = key[q + 1];
        id[q] = id[q + 1];
      }
      key[PL - 1] = 0u;
      id[PL - 1] = 0xffffffffu;
    }
  }
  return sum;
}

/// One token's scores, optional bias and group limit, top-k (ties to the lower id, in rank order)
/// and weights — the same rule as the CPU's `route_from_logits` — by one warp (one thread per token
/// would leave the layer waiting on a long serial chain), the experts strided over the lanes;
/// `choice`/`score` are this warp's shared scratch of `experts` floats, `gs`/`keep` of `n_group`.
/// The logits are the sum of `parts` slices `part_stride` floats apart (the split router GEMM's
/// products), added from the last slice to the first (the smallest products first).
__device__ void gate_token_warp(const float* logits, int parts, int64_t part_stride, const float* bias,
                                const gate_params& p, int row, int* out_idx, float* out_w, float* score, float* choice,
                                float* gs, int* keep) {
  const int lane = threadIdx.x & 31, E = p.experts;
  const float* l = logits + int64_t(row) * E;  // read through L2 (__ldcg): other blocks wrote them
  for (int i = lane; i < E; i += 32) {
    float v = __ldcg(l + (parts - 1) * part_stride + i);
    for (int q = parts - 2; q >= 0; --q) v += __ldcg(l + q * part_stride + i);
    score[i] = v;  // the logit, until the scores replace it
  }
  if (p.sigmoid) {
    for (int i = lane; i < E; i += 32) score[i] = 1.0f / (1.0f + expf(-score[i]));
  } else {
    float m = -INFINITY;
    for (int i = lane; i < E; i += 32) m = fmaxf(m, score[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sum = 0;
    for (int i = lane; i < E; i += 32) {
      score[i] = expf(score[i] - m);
      sum += score[i];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = lane; i < E; i += 32) score[i] *= inv;
  }
  for (int i = lane; i < E; i += 32) choice[i] = score[i] + (bias ? bias[i] : 0.0f);
  __syncwarp();
  if (p.method != 0 && p.n_group > 1) {
    const int per = E / p.n_group;
    for (int g = lane; g < p.n_group; g += 32) {
      float best = -INFINITY, second = -INFINITY;
      for (int i = 0; i < per; ++i) {
        const float v = choice[g * per + i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      gs[g] = p.method == 2 ? (per >= 2 ? best + second : best) : best;
      keep[g] = 0;
    }
    __syncwarp();
    if (lane == 0)
      for (int j = 0; j < p.topk_group; ++j) {
        int arg = -1;
        for (int g = 0; g < p.n_group; ++g)
          if (!keep[g] && (arg < 0 || gs[g] > gs[arg])) arg = g;
        keep[arg] = 1;
      }
    __syncwarp();
    for (int i = lane; i < E; i += 32)
      if (!keep[i / per]) choice[i] = 0.0f;
    __syncwarp();
  }
  // Top-k: k rounds, each the largest choice left, the lowest expert id among equals.
  int* idx = out_idx + int64_t(row) * p.k;
  float* w = out_w + int64_t(row) * p.k;
  double sum = 0;
  if (E <= 32) sum = top_k_lanes<1>(choice, score, E, p.k, lane, idx, w);
  else if (E <= 64) sum = top_k_lanes<2>(choice, score, E, p.k, lane, idx, w);
  else if (E <= 128) sum = top_k_lanes<4>(choice, score, E, p.k, lane, idx, w);
  else if (E <= 256) sum = top_k_lanes<8>(choice, score, E, p.k, lane, idx, w);
  else sum = top_k_lanes<max_experts / 32>(choice, score, E, p.k, lane, idx, w);
  __syncwarp();  // lane 0's weights, seen by the lanes that finish them
  const bool normalise = p.norm && !(p.scale_only_unnormalised && p.k == 1);
  const bool scale = p.scale != 1.0f && !(normalise && p.scale_only_unnormalised);
  for (int j = lane; j < p.k; j += 32) {
    float v = w[j];
    if (normalise) v = static_cast<float>(v / (sum + p.norm_eps));
    if (scale) v = static_cast<float>(static_cast<double>(v) * p.scale);
    w[j] = v;
  }
}

/// Shared scratch of the small-step routing kernel's warp gating, per warp.
constexpr int gate_warp_floats = 2 * max_experts + 2 * max_groups;

/// Gating of a large step: one warp per token (gate_token_warp), gate_block_warps tokens per block.
constexpr int gate_block_warps = 4;
/// Block 0 also zeroes counts[0 .. experts) for the count_kernel after it.
__global__ void __launch_bounds__(32 * gate_block_warps) gate_kernel(const float* logits, int parts, const float* bias,
                                                                     gate_params p, int64_t t, int* out_idx, float* out_w,
                                                                     int* counts) {
  __shared__ float scratch[gate_block_warps][gate_warp_floats];
  pdl_trigger();
  pdl_wait();
  if (blockIdx.x == 0)
    for (int i = static_cast<int>(threadIdx.x); i < p.experts; i += static_cast<int>(blockDim.x)) counts[i] = 0;
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int64_t row = blockIdx.x * int64_t(gate_block_warps) + warp;
  if (row >= t) return;  // the whole warp: gate_token_warp's shuffles need all 32 lanes
  float* sc = scratch[warp];
  gate_token_warp(logits, parts, t * p.experts, bias, p, static_cast<int>(row), out_idx, out_w, sc, sc + max_experts,
                  sc + 2 * max_experts,
                  reinterpret_cast<int*>(sc + 2 * max_experts + max_groups));
}

/// The whole routing of a small step in one block of 32 · gemv_max_rows threads: gating per token
/// (a warp each), then the GEMV work list (local experts in ascending id order, each expert's rows
/// in token order) and every pair's row (`pos`, -1 for experts not held here). Deterministic: no
/// atomics. It runs alone on one SM on the step's critical path, so the choices stay in shared
/// memory (no trip through L2 between the phases) and the work list is one block-wide scan.
constexpr int route_small_threads = 32 * gemv_max_rows;
constexpr int route_small_per_thread = max_experts / route_small_threads;  // experts a thread counts
static_assert(max_experts % route_small_threads == 0 && gemv_max_pairs < (1 << 15));
__device__ void route_small(const float* logits, const float* bias, const gate_params& gp, int t, const int* slot,
                            int* idx, float* wts, int* pos, int* n_act, int* act, int* start, int* cnt, int* row_tok) {
  using scan = cub::BlockScan<int, route_small_threads>;
  __shared__ typename scan::TempStorage tmp;
  __shared__ int s_idx[gemv_max_pairs];
  __shared__ float s_w[gemv_max_pairs];
  __shared__ int s_start[max_experts];  // an expert's first row, -1 where it is not held here
  __shared__ float s_gate[gemv_max_rows][gate_warp_floats];
  const int n = t * gp.k, tid = threadIdx.x, warp = tid >> 5;
  if (warp < t) {  // one warp per token
    float* sc = s_gate[warp];
    gate_token_warp(logits, 1, 0, bias, gp, warp, s_idx, s_w, sc, sc + max_experts, sc + 2 * max_experts,
                    reinterpret_cast<int*>(sc + 2 * max_experts + max_groups));
  }
  __syncthreads();
  for (int i = tid; i < n; i += route_small_threads) {
    idx[i] = s_idx[i];
    wts[i] = s_w[i];
  }
  // Thread tid counts experts tid · per_thread + j (a blocked arrangement: ascending ids along the
  // scan). Rows and live experts scanned together, packed as rows · 2^16 + live (rows ≤ n < 2^15).
  int c[route_small_per_thread], packed[route_small_per_thread];
  bool held[route_small_per_thread];
#pragma unroll
  for (int j = 0; j < route_small_per_thread; ++j) {
    const int e = tid * route_small_per_thread + j;
    held[j] = e < gp.experts && slot[e] >= 0;
    c[j] = 0;
    if (held[j])
      for (int i = 0; i < n; ++i) c[j] += s_idx[i] == e;
    packed[j] = (c[j] << 16) | (c[j] > 0 ? 1 : 0);
  }
  int total = 0;
  scan(tmp).ExclusiveSum(packed, packed, total);
#pragma unroll
  for (int j = 0; j < route_small_per_thread; ++j) {
    const int e = tid * route_small_per_thread + j;
    if (e >= gp.experts) continue;
    const int r = packed[j] >> 16, a = packed[j] & 0xffff;
    s_start[e] = held[j] ? r : -1;
    if (c[j] > 0) {
      act[a] = e;
      start[a] = r;
      cnt[a] = c[j];
    }
  }
  if (tid == 0) *n_act = total & 0xffff;
  __syncthreads();
  for (int i = tid; i < n; i += route_small_threads) {
    const int e = s_idx[i];
    if (s_start[e] < 0) {
      pos[i] = -1;
      continue;
    }
    int rank = 0;
    for (int i2 = 0; i2 < i; ++i2) rank += s_idx[i2] == e;
    const int row = s_start[e] + rank;
    pos[i] = row;
    row_tok[row] = i / gp.k;
  }
}

/// Warps per expert of the small-step router logits: each reads an interleaved quarter of the
/// expert's router row, so a row of 2048 floats is four loads per lane, all in flight at once.
constexpr int router_split = 4;

/// Router logits and routing of a small step in one launch: `router_split` warps compute one
/// expert's logits for the t ≤ R tokens in fp32 (router rows streamed once), and the block that
/// finishes last (a device-wide counter, reset for the next launch) runs `route_small` on all of
/// them. blockDim.x = 32 · gemv_max_rows, gemv_max_rows / router_split experts per block.
template <int R>
__global__ void __launch_bounds__(32 * gemv_max_rows) router_route_small_kernel(
    const float* __restrict__ x, int h, const float* __restrict__ router, const float* bias, gate_params gp, int t,
    const int* slot, float* logits, unsigned* done, int* idx, float* wts, int* pos, int* n_act, int* act, int* start,
    int* cnt, int* row_tok) {
  pdl_trigger();
  pdl_wait();
  static_assert(gemv_max_rows % router_split == 0);
  __shared__ float s_part[gemv_max_rows][R];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = warp % router_split;
  const int e = blockIdx.x * (gemv_max_rows / router_split) + warp / router_split;
  if (e < gp.experts) {
    const float* w = router + int64_t(e) * h;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    // Rows past t repeat the last one (their sums are dropped), so every load is unconditional and
    // an iteration's loads are all in flight together: this kernel has few warps to hide latency.
#pragma unroll 4
    for (int c = (part * 32 + lane) * 4; c < h; c += 128 * router_split) {
      const float4 wv = __ldg(reinterpret_cast<const float4*>(w + c));
      float4 xv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) xv[r] = __ldg(reinterpret_cast<const float4*>(x + int64_t(min(r, t - 1)) * h + c));
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += wv.x * xv[r].x + wv.y * xv[r].y + wv.z * xv[r].z + wv.w * xv[r].w;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
      if (lane == 0) s_part[warp][r] = acc[r];
    }
  }
  __syncthreads();
  if (e < gp.experts && part == 0 && lane < t && lane < R) {  // the warp's quarters, summed in a fixed order
    float v = 0.0f;
    for (int q = 0; q < router_split; ++q) v += s_part[warp + q][lane];
    logits[int64_t(lane) * gp.experts + e] = v;
  }
  // The last block to finish sees every block's logits. One thread a block fences and counts (the
  // barrier before it orders the block's writes; the one after, the last block's reads), as a grid
  // barrier does, instead of a fence in every thread.
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last) __threadfence();
  }
  __syncthreads();
  if (!last) return;
  route_small(logits, bias, gp, t, slot, idx, wts, pos, n_act, act, start, cnt, row_tok);
  if (threadIdx.x == 0) *done = 0;
}

/// A device's expert weights and the grouped-GEMM machinery shared by both public classes.
struct expert_engine {
  int device = 0;
  int64_t hidden = 0, ffn = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  bool grouped_ok = true;  ///< cleared when the library refuses the grouped call (then one GEMM per expert)
  bool fused_ok = false;   ///< our grouped GEMM kernels run here (sm_90 device, widths they take)
  bool pdl_ok = false;     ///< programmatic dependent launch exists here and the kernels carry its waits (may_overlap)
  gemm_mode mode = gemm_mode::automatic;
  gemv_tuning tuning;
  fused_tuning fused;
  int calls = 0;           ///< GEMM calls since the stream was last idle: picks the pointer buffer
  struct weights {
    dbuf gate_up, down;  // bf16 [2F, H], [H, F]
  };
  std::map<int, std::unique_ptr<weights>> experts;
  dbuf gu, h;  // scratch
  dbuf ptrs[2];  // device pointer arrays of the two grouped or batched calls of a forward
  hbuf host_ptrs[2];
  dbuf gu_tab, dn_tab;  // device tables of every expert's weight pointers, by id (the GEMV path)
  bool tabs_stale = true;
  dbuf hmid;            // GEMV path: f32 SwiGLU activations [rows, F]
  dbuf tiles;           // fused path: the step's tile list
  hbuf tiles_host;
  dbuf gu_maps, dn_maps;  // fused path: tensor maps of every expert's two matrices, by id
  moe_gemm_setup fused_setup;
  gemm_mode last = gemm_mode::automatic;  // the launch kind the last batch ran with
  int last_cluster = 0;                   // fused: the CTAs a cluster it ran with

  ~expert_engine() {
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  caf::error init(int dev, int64_t hid, int64_t f) {
    device = dev;
    hidden = hid;
    ffn = f;
    SY_CU(cudaSetDevice(device));
    SY_CU(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    SY_CUBLAS(cublasCreate(&blas));
    SY_CUBLAS(cublasSetStream(blas, stream));
    fused_ok = moe_gemm_available(device) && moe_gemm_shapes(hidden, ffn);
    // The kernels' waits exist only in code built for compute capability 9.0 on (a build for an
    // older one, run through the JIT on a newer device, has none: no overlapped launches then).
    int major = 0;
    cudaFuncAttributes fa{};
    pdl_ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9 &&
             cudaFuncGetAttributes(&fa, gate_kernel) == cudaSuccess && fa.ptxVersion >= 90;
    if (fused_ok) SY_CU(moe_gemm_prepare(device, &fused_setup));
    return {};
  }

  caf::error upload_matrix(dbuf& dst, const matrix& m) {
    std::vector<uint16_t> host(static_cast<size_t>(m.rows() * m.cols()));
    std::vector<float> row(static_cast<size_t>(m.cols()));
    for (int64_t r = 0; r < m.rows(); ++r) {
      m.row_f32(r, row.data());
      for (int64_t c = 0; c < m.cols(); ++c) host[static_cast<size_t>(r * m.cols() + c)] = f32_to_bf16(row[static_cast<size_t>(c)]);
    }
    SY_TRY(dst.reserve(host.size() * 2));
    SY_CU(cudaMemcpy(dst.p, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    return {};
  }

  caf::error add(int id, const expert_weights& w) {
    if (w.hidden() != hidden || w.ffn() != ffn)
      return make_error(model_errc::invalid_argument, "gpu experts: expert " + std::to_string(id) + " is [" +
                                                          std::to_string(w.hidden()) + ", " + std::to_string(w.ffn()) +
                                                          "], the device set holds [" + std::to_string(hidden) + ", " +
                                                          std::to_string(ffn) + "]");
    SY_CU(cudaSetDevice(device));
    auto x = std::make_unique<weights>();
    SY_TRY(upload_matrix(x->gate_up, w.gate_up));
    SY_TRY(upload_matrix(x->down, w.down));
    experts[id] = std::move(x);
    tabs_stale = true;
    return {};
  }

  /// The weight-pointer tables (GEMV path) and tensor-map tables (fused path), refreshed after
  /// experts were added or removed (a blocking copy: once after loading).
  caf::error tables() {
    if (!tabs_stale) return {};
    const int n = experts.empty() ? 1 : experts.rbegin()->first + 1;
    std::vector<const void*> g(static_cast<size_t>(n), nullptr), d(static_cast<size_t>(n), nullptr);
    for (auto& [id, w] : experts) {
      g[static_cast<size_t>(id)] = w->gate_up.p;
      d[static_cast<size_t>(id)] = w->down.p;
    }
    SY_TRY(gu_tab.reserve(g.size() * sizeof(void*)));
    SY_TRY(dn_tab.reserve(d.size() * sizeof(void*)));
    SY_CU(cudaStreamSynchronize(stream));
    SY_CU(cudaMemcpy(gu_tab.p, g.data(), g.size() * sizeof(void*), cudaMemcpyHostToDevice));
    SY_CU(cudaMemcpy(dn_tab.p, d.data(), d.size() * sizeof(void*), cudaMemcpyHostToDevice));
    if (fused_ok) {
      std::vector<unsigned char> maps(g.size() * moe_map_bytes);
      SY_TRY(gu_maps.reserve(maps.size()));
      SY_TRY(dn_maps.reserve(maps.size()));
      SY_CU(moe_weight_maps(g.data(), n, 2 * ffn, hidden, maps.data()));
      SY_CU(cudaMemcpy(gu_maps.p, maps.data(), maps.size(), cudaMemcpyHostToDevice));
      SY_CU(moe_weight_maps(d.data(), n, hidden, ffn, maps.data()));
      SY_CU(cudaMemcpy(dn_maps.p, maps.data(), maps.size(), cudaMemcpyHostToDevice));
    }
    tabs_stale = false;
    return {};
  }

  /// Modes that leave to `automatic` the batches they do not take: `gemv` above its rows, `fused`
  /// where its kernels cannot run.
  bool defers_to_automatic() const {
    return mode == gemm_mode::automatic || mode == gemm_mode::gemv || mode == gemm_mode::fused;
  }

  /// Whether the GEMV kernels take these shapes (16-byte loads along rows of H and F).
  bool gemv_shapes() const { return hidden % 8 == 0 && ffn % 8 == 0; }
  /// Few large experts (Mixtral-like: ≤ 16 of ≥ 16M weights per matrix) favour cuBLAS's kernels
  /// above two rows per expert on average; many small ones favour the GEMV path up to 8 (measured
  /// on an H200 with streaming weight loads, docs/benchmarks.md: Mixtral's 5-8 tokens, 2 rows per
  /// expert, 0.50-0.74 ms by GEMV against 0.57-0.81 grouped; above 8 tokens GEMV is not built).
  bool few_large(size_t experts_active) const {
    return experts_active <= 16 && 2 * ffn * hidden >= (int64_t{16} << 20);
  }
  /// The GEMV path for a batch of `rows` rows over `groups` experts, the largest `most`.
  bool use_gemv(int most, int64_t rows, size_t groups) const {
    if (!defers_to_automatic() || (mode == gemm_mode::fused && fused_ok)) return false;
    if (most > gemv_max_rows || !gemv_shapes()) return false;
    return mode == gemm_mode::gemv || !few_large(groups) || rows <= 2 * static_cast<int64_t>(groups);  // fused: as automatic
  }

  /// The GEMV path on the work list `wk` (at most `max_act` experts, `rows` rows of at most
  /// `max_rows` ≤ gemv_max_rows each): f32 inputs x (rows picked by the work list), f32 outputs
  /// y [rows, H] in work-list row order. Two launches, no host round trip.
  caf::error gemv(const float* x, const gemv_work& wk, int max_act, int max_rows, int64_t rows, float* y) {
    if (max_act <= 0) return {};
    SY_TRY(tables());
    SY_TRY(hmid.reserve(static_cast<size_t>(rows * ffn) * 4));
    last = gemm_mode::gemv;
    if (max_rows <= 1) return gemv_rows<1>(x, wk, max_act, rows, y);
    if (max_rows <= 2) return gemv_rows<2>(x, wk, max_act, rows, y);
    if (max_rows <= 4) return gemv_rows<4>(x, wk, max_act, rows, y);
    return gemv_rows<gemv_max_rows>(x, wk, max_act, rows, y);
  }

  template <int R>
  caf::error gemv_rows(const float* x, const gemv_work& wk, int max_act, int64_t rows, float* y) {
    // Rows per warp when the tuning leaves them open (0), by the largest row count R: the best
    // of the sweep on an H200 (bench_gpu_moe --gemv-sweep, Mixtral and Qwen3 shapes, streaming
    // weight loads, the kernels' 128-register cap at R = 8). At R = 8 it depends on whether some
    // expert must get several rows (more rows than expert slots: Mixtral's 8 tokens, 4 and 4 per
    // warp) or most get one or two (Qwen3's 8 tokens over 128 experts: 8 and 8).
    const bool crowded = rows > static_cast<int64_t>(max_act);
    const int gu = tuning.gate_up_rows != 0 ? tuning.gate_up_rows : (R == 8 && !crowded ? 8 : 4);
    const int dn = tuning.down_rows != 0 ? tuning.down_rows : (R == 2 ? 2 : R == 8 && !crowded ? 8 : 4);
    SY_TRY((gu == 8 ? gemv_gate_up<8, R>(x, wk, max_act) : gemv_gate_up<4, R>(x, wk, max_act)));
    switch (dn) {
      case 4: return gemv_down<4, R>(wk, max_act, y);
      case 8: return gemv_down<8, R>(wk, max_act, y);
      default: return gemv_down<2, R>(wk, max_act, y);
    }
  }

  /// NW weight rows per warp (NW/2 output columns: a gate row and its up row each).
  template <int NW, int R>
  caf::error gemv_gate_up(const float* x, const gemv_work& wk, int max_act) {
    const dim3 ga(static_cast<unsigned>((ffn + gemv_warps * (NW / 2) - 1) / (gemv_warps * (NW / 2))),
                  static_cast<unsigned>(max_act));
    SY_CU((launch_k(gemv_overlap(), gemv_gate_up_kernel<NW, R>, ga, dim3(gemv_warps * 32), stream, x, static_cast<int>(hidden),
                   static_cast<int>(ffn), gu_tab.as<const bf16*>(), wk, hmid.as<float>(), tuning.split)));
    return {};
  }

  template <int NW, int R>
  caf::error gemv_down(const gemv_work& wk, int max_act, float* y) {
    const dim3 gb(static_cast<unsigned>((hidden + gemv_warps * NW - 1) / (gemv_warps * NW)), static_cast<unsigned>(max_act));
    SY_CU((launch_k(gemv_overlap(), gemv_down_kernel<NW, R>, gb, dim3(gemv_warps * 32), stream, hmid.as<float>(),
                   static_cast<int>(hidden), static_cast<int>(ffn), dn_tab.as<const bf16*>(), wk, y, tuning.split)));
    return {};
  }

  size_t bytes() const { return experts.size() * static_cast<size_t>(3 * hidden * ffn) * 2; }

  /// The A, B and C pointers of a batched cuBLAS call in device memory (`*dp`: A's, then B's, then
  /// C's), copied on the stream. Each call of a forward uses the other of two buffers; the forward
  /// starts with the stream idle, so no buffer can still feed an earlier copy.
  caf::error pointer_arrays(const std::vector<const void*>& a, const std::vector<const void*>& b,
                            const std::vector<void*>& c, void*** dp) {
    const size_t groups = a.size();
    const size_t pbytes = groups * sizeof(void*);
    auto& hptr = host_ptrs[calls % 2];
    auto& dptr = ptrs[calls % 2];
    ++calls;
    SY_TRY(hptr.reserve(3 * pbytes));
    SY_TRY(dptr.reserve(3 * pbytes));
    auto** hp = hptr.as<const void*>();
    for (size_t g = 0; g < groups; ++g) {
      hp[g] = a[g];
      hp[groups + g] = b[g];
      hp[2 * groups + g] = c[g];
    }
    SY_CU(cudaMemcpyAsync(dptr.p, hptr.p, 3 * pbytes, cudaMemcpyHostToDevice, stream));
    *dp = dptr.as<void*>();
    return {};
  }

  /// C_g = op(A_g) · B_g for each group g (column-major view of our row-major data), bf16 in and
  /// out, fp32 accumulation: one grouped launch, or one GEMM per group if the library refuses.
  caf::error grouped(int m, const std::vector<int>& n, int k, const std::vector<const void*>& a, int lda,
                     const std::vector<const void*>& b, int ldb, const std::vector<void*>& c, int ldc) {
    const int groups = static_cast<int>(n.size());
    if (groups == 0) return {};
    // Measured on an H200 (docs/benchmarks.md): few large experts (Mixtral's 4096×14336) run faster
    // as one cuBLAS GEMM per expert at every token count (its GEMV kernels at 1 token, 83% of the
    // GEMM roofline at 4096); many small experts (Qwen3's 128 of 2048×768) run faster grouped at
    // every token count, where per-expert launches dominate.
    const bool few_large = groups <= 16 && (static_cast<int64_t>(m) * k >= (int64_t{16} << 20)) &&
                           *std::max_element(n.begin(), n.end()) > 64;  // grouped wins below
    const bool use_grouped = mode == gemm_mode::grouped || (defers_to_automatic() && !few_large);
    if (grouped_ok && use_grouped) {
      std::vector<cublasOperation_t> ta(static_cast<size_t>(groups), CUBLAS_OP_T), tb(static_cast<size_t>(groups), CUBLAS_OP_N);
      std::vector<int> ms(static_cast<size_t>(groups), m), ks(static_cast<size_t>(groups), k), ldas(static_cast<size_t>(groups), lda),
          ldbs(static_cast<size_t>(groups), ldb), ldcs(static_cast<size_t>(groups), ldc), sizes(static_cast<size_t>(groups), 1);
      std::vector<float> alpha(static_cast<size_t>(groups), 1.0f), beta(static_cast<size_t>(groups), 0.0f);
      void** dp = nullptr;
      SY_TRY(pointer_arrays(a, b, c, &dp));
      const auto st = cublasGemmGroupedBatchedEx(blas, ta.data(), tb.data(), ms.data(), n.data(), ks.data(), alpha.data(),
                                                 const_cast<const void* const*>(dp), CUDA_R_16BF, ldas.data(),
                                                 const_cast<const void* const*>(dp + groups), CUDA_R_16BF, ldbs.data(),
                                                 beta.data(), dp + 2 * groups, CUDA_R_16BF, ldcs.data(), groups,
                                                 sizes.data(), CUBLAS_COMPUTE_32F);
      if (st == CUBLAS_STATUS_SUCCESS) {
        last = gemm_mode::grouped;
        return {};
      }
      if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) return blas_fail("cublasGemmGroupedBatchedEx", st);
      grouped_ok = false;
    }
    last = gemm_mode::per_expert;
    const float alpha = 1.0f, beta = 0.0f;
    for (int g = 0; g < groups; ++g)
      SY_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n[static_cast<size_t>(g)], k, &alpha, a[static_cast<size_t>(g)],
                             CUDA_R_16BF, lda, b[static_cast<size_t>(g)], CUDA_R_16BF, ldb, &beta, c[static_cast<size_t>(g)],
                             CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return {};
  }

  /// C_g = op(A_g) · B_g for every group, all of n columns (one batched cuBLAS call).
  caf::error batched(int m, int n, int k, const std::vector<const void*>& a, int lda, const std::vector<const void*>& b,
                     int ldb, const std::vector<void*>& c, int ldc) {
    const int groups = static_cast<int>(a.size());
    if (groups == 0) return {};
    last = gemm_mode::padded;
    void** dp = nullptr;
    SY_TRY(pointer_arrays(a, b, c, &dp));
    const float alpha = 1.0f, beta = 0.0f;
    SY_CUBLAS(cublasGemmBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, const_cast<const void* const*>(dp),
                                  CUDA_R_16BF, lda, const_cast<const void* const*>(dp + groups), CUDA_R_16BF, ldb, &beta,
                                  dp + 2 * groups, CUDA_R_16BF, ldc, groups, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return {};
  }

  /// Whether a batch of experts with these row counts, known on the host (an expert host's
  /// batches; layer steps not planned on the device, `fused_without_counts`), runs on our grouped
  /// GEMM kernels (`fused`): when asked for, and (`automatic`, above the GEMV path) for many small experts while they
  /// average at most one and a half tiles (192 rows) each, or cuBLAS's padded batch would pad too
  /// much, and for few large experts while the weight reads bound the step (at most
  /// padded_free_rows rows each). Measured (docs/benchmarks.md, 2026-12-06 night): ours beat the
  /// padded batch on Qwen3-shaped layers up to 2048 tokens (128 rows an expert) and on Mixtral's at
  /// 64 tokens (0.98 vs 1.05 ms on an H100); cuBLAS wins Qwen3 at 4096 (256 rows an expert: 0.99 vs
  /// 1.07 ms on the H100, 0.85 vs 0.90 on an H200) and Mixtral from 512 tokens on, where its
  /// kernels run those GEMMs faster than ours.
  bool use_fused(const std::vector<int>& cnt) const {
    if (!fused_ok || cnt.empty()) return false;
    if (mode == gemm_mode::fused) return true;
    if (!defers_to_automatic()) return false;
    if (few_large(cnt.size())) return *std::max_element(cnt.begin(), cnt.end()) <= padded_free_rows;
    int64_t rows = 0;
    for (int c : cnt) rows += c;
    return 2 * rows <= 3 * int64_t{moe_tile_rows} * static_cast<int64_t>(cnt.size()) || !padding_cheap(cnt);
  }

  /// Experts ids[g] on rows [off[g], off[g] + n[g]) of the packed row space into the same rows of
  /// yo (bf16 [rows, H]): our two grouped kernels (gate_up with SwiGLU, down), no padding. Input row
  /// r is x's row row_idx[r] (the token rows, no gathered copy), or x's row r when row_idx is null.
  caf::error compute_fused(const std::vector<int>& ids, const std::vector<int>& off, const std::vector<int>& n,
                           const bf16* x, const int* row_idx, int64_t total_rows, bf16* yo) {
    if (ids.empty()) return {};
    SY_TRY(tables());
    // As a device-planned step (total_rows: the packed rows, fused never pads).
    const int cluster = planned_cluster(total_rows, static_cast<int>(ids.size()));
    const size_t count = moe_tile_list(cluster, ids.data(), off.data(), n.data(), ids.size(), nullptr);
    // Callers enter with the stream idle: the pinned list can be rewritten.
    SY_TRY(tiles_host.reserve(count * sizeof(moe_tile)));
    SY_TRY(tiles.reserve(count * sizeof(moe_tile)));
    SY_TRY(h.reserve(static_cast<size_t>(total_rows * ffn) * 2));
    moe_tile_list(cluster, ids.data(), off.data(), n.data(), ids.size(), tiles_host.as<moe_tile>());
    SY_CU(cudaMemcpyAsync(tiles.p, tiles_host.p, count * sizeof(moe_tile), cudaMemcpyHostToDevice, stream));
    return launch_fused(cluster, tiles.as<const moe_tile>(), static_cast<int>(count), nullptr, x, row_idx, total_rows, yo);
  }

  /// Whether the fused kernels run as pairs of CTAs: where the device runs them, when asked
  /// for, or (no cluster size asked for) when `automatic` would want them (`good`).
  bool pairs(bool good) const {
    return fused_setup.clusters2 > 0 && (fused.cluster == 2 || (fused.cluster == 0 && good));
  }
  /// The cluster size a step of n routed rows over `experts` runs with: pairs from a full tile an
  /// expert on average. Measured on an H100 (docs/benchmarks.md, 2026-12-07, third session), the
  /// odd last tiles in mixed pairs: Qwen3-shaped at 512 tokens (32 rows an expert) pairs and
  /// single CTAs both 0.51 ms, at 2048 (128) pairs 0.65 vs 0.75, at 4096 0.91 vs 1.07; Mixtral-shaped
  /// at 64 tokens (16 rows) both 0.99-1.00, at 512 (128) pairs 1.18 vs 1.43. (Before mixed pairs,
  /// when an odd tile paired with an empty one, single CTAs won below a tile an expert.)
  int planned_cluster(int64_t n, int experts) const {
    return pairs(n >= int64_t{moe_tile_rows} * experts) ? 2 : 1;
  }

  /// The same with the tile list already on the device (`plan_kernel`, made for `cluster`):
  /// `tile_count` tiles of `tl`, at most `most`, over at most `rows_most` packed rows.
  caf::error compute_fused_planned(int cluster, const moe_tile* tl, const int* tile_count, int most, const bf16* x,
                                   const int* row_idx, int64_t rows_most, bf16* yo) {
    SY_TRY(tables());
    SY_TRY(h.reserve(static_cast<size_t>(std::max<int64_t>(rows_most, 1) * ffn) * 2));
    return launch_fused(cluster, tl, most, tile_count, x, row_idx, std::max<int64_t>(rows_most, 1), yo);
  }

  /// Whether kernels asked to launch overlapping the one before them (`asked`: a tuning's `pdl`)
  /// may: only where their waits exist (pdl_ok), else a launch could overtake what it reads.
  bool may_overlap(bool asked) const { return asked && pdl_ok; }
  /// A large step's kernels launched to overlap the one before them (fused_tuning::pdl).
  bool overlap() const { return may_overlap(fused.pdl); }
  /// A small step's four kernels (routing, the two GEMVs, combine) likewise (gemv_tuning::pdl).
  bool gemv_overlap() const { return may_overlap(tuning.pdl); }

  caf::error launch_fused(int cluster, const moe_tile* tl, int count, const int* tile_count, const bf16* x,
                          const int* row_idx, int64_t h_rows, bf16* yo) {
    SY_CU(moe_gate_up(fused_setup, cluster, tl, count, tile_count, x, row_idx, gu_maps.p, static_cast<int>(hidden),
                      static_cast<int>(ffn), h.p, overlap(), stream));
    SY_CU(moe_down(fused_setup, cluster, tl, count, tile_count, h.p, h_rows, dn_maps.p, static_cast<int>(hidden),
                   static_cast<int>(ffn), yo, overlap(), stream));
    last = gemm_mode::fused;
    last_cluster = cluster;
    return {};
  }

  /// Whether a layer step of `t` tokens routed to `k` of `experts` experts each runs `fused` with
  /// its tile list made on the device (`plan_kernel`), decided before any count is known: when
  /// `fused` is asked for, or (`automatic`) for many small experts at any size and for few large
  /// ones up to a tile (moe_tile_rows) an expert on average. Measured on an H100
  /// (docs/benchmarks.md, 2026-12-07), Qwen3-shaped: with the list made on the device (no trip to
  /// the host) the fused kernels beat cuBLAS's padded batch at every size, 0.98 vs 1.02 ms at
  /// 4096 tokens and 1.61 vs 1.66 at 8192; planned on the host they lose there (1.04 at 4096).
  /// Mixtral-shaped (fifth session), device-planned fused against automatic's earlier choice:
  /// 128 tokens 1.00 vs 1.02 (fused planned on the host), 256 1.03 vs 1.13 and 512 1.12 vs 1.23
  /// (padded); at 1024 (256 rows an expert) cuBLAS's padded batch is faster on the device (1.30-1.38
  /// vs 1.51-1.54 ms). Other steps bring their counts to the host and decide by them.
  bool fused_without_counts(int64_t t, int64_t k, int local, int64_t experts) const {
    if (!fused_ok || t <= 0) return false;
    if (mode == gemm_mode::fused) return true;
    if (!defers_to_automatic()) return false;
    const int64_t n = t * k;
    return !few_large(static_cast<size_t>(std::min<int64_t>(local, n))) || n <= int64_t{moe_tile_rows} * experts;
  }

  /// Experts ids[g] on rows [g·mpad, g·mpad + mpad) of xs (bf16, padded to mpad rows per expert)
  /// into the same rows of yo: two batched GEMMs and the SwiGLU kernel over every padded row.
  caf::error compute_padded(const std::vector<int>& ids, int mpad, const bf16* xs, bf16* yo) {
    if (ids.empty()) return {};
    calls = 0;
    const int64_t rows = static_cast<int64_t>(ids.size()) * mpad;
    SY_TRY(gu.reserve(static_cast<size_t>(rows * 2 * ffn) * 2));
    SY_TRY(h.reserve(static_cast<size_t>(rows * ffn) * 2));
    std::vector<const void*> a, b;
    std::vector<void*> c;
    for (size_t g = 0; g < ids.size(); ++g) {
      a.push_back(experts.at(ids[g])->gate_up.p);
      b.push_back(xs + int64_t(g) * mpad * hidden);
      c.push_back(gu.as<bf16>() + int64_t(g) * mpad * 2 * ffn);
    }
    SY_TRY(batched(static_cast<int>(2 * ffn), mpad, static_cast<int>(hidden), a, static_cast<int>(hidden), b,
                   static_cast<int>(hidden), c, static_cast<int>(2 * ffn)));
    swiglu_kernel<<<blocks_for(swiglu_threads(rows, ffn)), 256, 0, stream>>>(gu.as<bf16>(), rows, ffn, h.as<bf16>());
    SY_CU(cudaGetLastError());
    for (size_t g = 0; g < ids.size(); ++g) {
      a[g] = experts.at(ids[g])->down.p;
      b[g] = h.as<bf16>() + int64_t(g) * mpad * ffn;
      c[g] = yo + int64_t(g) * mpad * hidden;
    }
    return batched(static_cast<int>(hidden), mpad, static_cast<int>(ffn), a, static_cast<int>(ffn), b,
                   static_cast<int>(ffn), c, static_cast<int>(hidden));
  }

  /// Rows per expert of the padded layout for these counts: the largest, rounded up to 8.
  static int padded_rows(const std::vector<int>& cnt) {
    int m = 0;
    for (int c : cnt) m = std::max(m, c);
    return (m + 7) / 8 * 8;
  }

  /// Whether a batch of experts with these row counts runs as padded batched GEMMs: when asked
  /// for, or (`automatic`) by what padding costs. Measured on an H200 (docs/benchmarks.md,
  /// bench_gpu_moe, 16-4096 tokens): cuBLAS's batched GEMM over padded rows beat the grouped call
  /// at every size for Qwen3's 128 small experts (0.31 vs 0.33 ms at 16 tokens, 0.60 vs 0.86 at
  /// 2048) and one GEMM per expert for Mixtral's 8 large ones up to 1024 tokens (1.28 vs 1.36 ms),
  /// equal above. So: padded while each expert has at most 64 rows (the weight reads bound the
  /// GEMMs, extra rows cost next to nothing), else while padding adds at most half the rows
  /// (a quarter for few large experts, whose per-expert GEMMs run near the roofline), and for few
  /// large experts not above 512 rows each.
  bool use_padded(const std::vector<int>& cnt) const {
    if (mode == gemm_mode::padded) return true;
    if (!defers_to_automatic() || use_fused(cnt)) return false;
    return padding_cheap(cnt);
  }
  /// `automatic`'s rule for padding, whatever runs instead.
  bool padding_cheap(const std::vector<int>& cnt) const {
    if (cnt.empty()) return false;
    const int mpad = padded_rows(cnt);
    if (mpad <= padded_free_rows) return true;
    int64_t rows = 0;
    for (int c : cnt) rows += c;
    const int64_t padded = static_cast<int64_t>(cnt.size()) * mpad;
    if (few_large(cnt.size())) return mpad <= 512 && padded * 4 <= rows * 5;
    return padded * 2 <= rows * 3;
  }

  /// Experts ids[g] on rows [offset[g], offset[g] + n[g]) of xs (bf16 [R, H]) into yo (bf16 [R, H]).
  caf::error compute(const std::vector<int>& ids, const std::vector<int>& offset, const std::vector<int>& n, const bf16* xs,
                     int64_t total_rows, bf16* yo) {
    if (ids.empty()) return {};
    calls = 0;  // callers enter with the stream idle
    SY_TRY(gu.reserve(static_cast<size_t>(total_rows * 2 * ffn) * 2));
    SY_TRY(h.reserve(static_cast<size_t>(total_rows * ffn) * 2));
    std::vector<const void*> a, b;
    std::vector<void*> c;
    for (size_t g = 0; g < ids.size(); ++g) {
      auto& w = *experts.at(ids[g]);
      a.push_back(w.gate_up.p);
      b.push_back(xs + int64_t(offset[g]) * hidden);
      c.push_back(gu.as<bf16>() + int64_t(offset[g]) * 2 * ffn);
    }
    SY_TRY(grouped(static_cast<int>(2 * ffn), n, static_cast<int>(hidden), a, static_cast<int>(hidden), b,
                   static_cast<int>(hidden), c, static_cast<int>(2 * ffn)));
    swiglu_kernel<<<blocks_for(swiglu_threads(total_rows, ffn)), 256, 0, stream>>>(gu.as<bf16>(), total_rows, ffn, h.as<bf16>());
    SY_CU(cudaGetLastError());
    for (size_t g = 0; g < ids.size(); ++g) {
      a[g] = experts.at(ids[g])->down.p;
      b[g] = h.as<bf16>() + int64_t(offset[g]) * ffn;
      c[g] = yo + int64_t(offset[g]) * hidden;
    }
    return grouped(static_cast<int>(hidden), n, static_cast<int>(ffn), a, static_cast<int>(ffn), b, static_cast<int>(ffn),
                   c, static_cast<int>(hidden));
  }
};

}  // namespace

bool device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why) *why = e != cudaSuccess ? std::string(cudaGetErrorString(e)) : std::string("no CUDA device");
    cudaGetLastError();  // clear the sticky error
    return false;
  }
  return true;
}

const char* to_string(gemm_mode m) {
  switch (m) {
    case gemm_mode::automatic: return "auto";
    case gemm_mode::grouped: return "grouped";
    case gemm_mode::per_expert: return "each";
    case gemm_mode::padded: return "padded";
    case gemm_mode::gemv: return "gemv";
    case gemm_mode::fused: return "fused";
  }
  return "?";
}

std::string device_description(int device) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) return "unknown device";
  char buf[640];
  std::snprintf(buf, sizeof buf, "%s, %d SMs, %.1f GiB", p.name, p.multiProcessorCount,
                static_cast<double>(p.totalGlobalMem) / (1 << 30));
  return buf;
}

// ---- gpu_experts ----

struct gpu_experts::impl {
  expert_engine engine;
  dbuf x32, xs, yo, y32, work;
  hbuf host, work_host;
};

gpu_experts::gpu_experts(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
gpu_experts::~gpu_experts() = default;

caf::expected<std::unique_ptr<gpu_experts>> gpu_experts::make(int device, int64_t hidden, int64_t ffn) {
  auto p = std::make_unique<impl>();
  if (auto e = p->engine.init(device, hidden, ffn)) return e;
  return std::unique_ptr<gpu_experts>(new gpu_experts(std::move(p)));
}

caf::error gpu_experts::add_expert(int id, const expert_weights& w) { return impl_->engine.add(id, w); }
void gpu_experts::remove_expert(int id) {
  auto& eng = impl_->engine;
  if (cudaSetDevice(eng.device) != cudaSuccess || cudaStreamSynchronize(eng.stream) != cudaSuccess) cudaGetLastError();
  if (eng.experts.erase(id) > 0) eng.tabs_stale = true;
}

bool gpu_experts::holds(int id) const { return impl_->engine.experts.count(id) > 0; }
size_t gpu_experts::device_bytes() const { return impl_->engine.bytes(); }

caf::error gpu_experts::run(std::span<const int> ids, std::span<const float* const> inputs, std::span<const int64_t> n,
                            std::span<float* const> outputs) {
  auto& eng = impl_->engine;
  auto& s = *impl_;
  const int64_t h = eng.hidden;
  std::vector<int> gid, cnt;
  std::vector<size_t> src;  // index into ids/inputs/outputs of each expert with rows
  int64_t rows = 0;
  int most = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!holds(ids[i]))
      return make_error(model_errc::invalid_argument, "gpu experts: expert " + std::to_string(ids[i]) + " is not held here");
    if (n[i] <= 0) continue;
    gid.push_back(ids[i]);
    cnt.push_back(static_cast<int>(n[i]));
    src.push_back(i);
    rows += n[i];
    most = std::max(most, static_cast<int>(n[i]));
  }
  if (rows == 0) return {};
  const bool gemv = eng.use_gemv(most, rows, gid.size());
  const bool fused = !gemv && eng.use_fused(cnt);
  const bool padded = !gemv && eng.use_padded(cnt);  // never where fused runs
  const int mpad = padded ? expert_engine::padded_rows(cnt) : 0;
  // Row offsets on the device: packed, or padded to mpad rows per expert.
  std::vector<int> off;
  int64_t span = 0;
  for (int c : cnt) {
    off.push_back(static_cast<int>(span));
    span += padded ? mpad : c;
  }
  SY_CU(cudaSetDevice(eng.device));
  const size_t fbytes = static_cast<size_t>(span * h) * 4;
  SY_TRY(s.host.reserve(fbytes));
  SY_TRY(s.x32.reserve(fbytes));
  SY_TRY(s.y32.reserve(fbytes));
  if (!gemv) {
    SY_TRY(s.xs.reserve(fbytes / 2));
    SY_TRY(s.yo.reserve(fbytes / 2));
  }
  SY_CU(cudaStreamSynchronize(eng.stream));
  for (size_t g = 0; g < gid.size(); ++g)
    std::memcpy(s.host.as<float>() + int64_t(off[g]) * h, inputs[src[g]], static_cast<size_t>(cnt[g] * h) * 4);
  SY_CU(cudaMemcpyAsync(s.x32.p, s.host.p, fbytes, cudaMemcpyHostToDevice, eng.stream));
  if (gemv) {
    // Work list: [n_act | act | start | cnt | row_tok], rows in input order.
    const size_t groups = gid.size(), words = 1 + 3 * groups + static_cast<size_t>(rows);
    SY_TRY(s.work_host.reserve(words * 4));
    SY_TRY(s.work.reserve(words * 4));
    int* w = s.work_host.as<int>();
    w[0] = static_cast<int>(groups);
    for (size_t g = 0; g < groups; ++g) {
      w[1 + g] = gid[g];
      w[1 + groups + g] = off[g];
      w[1 + 2 * groups + g] = cnt[g];
    }
    for (int64_t r = 0; r < rows; ++r) w[1 + 3 * groups + static_cast<size_t>(r)] = static_cast<int>(r);
    SY_CU(cudaMemcpyAsync(s.work.p, s.work_host.p, words * 4, cudaMemcpyHostToDevice, eng.stream));
    const int* d = s.work.as<int>();
    const gemv_work wk{d, d + 1, d + 1 + groups, d + 1 + 2 * groups, d + 1 + 3 * groups};
    SY_TRY(eng.gemv(s.x32.as<float>(), wk, static_cast<int>(groups), most, rows, s.y32.as<float>()));
  } else {
    f32_to_bf16_kernel<<<blocks_for(convert_threads(span * h)), 256, 0, eng.stream>>>(s.x32.as<float>(), s.xs.as<bf16>(), span * h);
    SY_CU(cudaGetLastError());
    if (fused)
      SY_TRY(eng.compute_fused(gid, off, cnt, s.xs.as<bf16>(), nullptr, span, s.yo.as<bf16>()));
    else if (padded)
      SY_TRY(eng.compute_padded(gid, mpad, s.xs.as<bf16>(), s.yo.as<bf16>()));
    else
      SY_TRY(eng.compute(gid, off, cnt, s.xs.as<bf16>(), span, s.yo.as<bf16>()));
    bf16_to_f32_kernel<<<blocks_for(convert_threads(span * h)), 256, 0, eng.stream>>>(s.yo.as<bf16>(), s.y32.as<float>(), span * h);
    SY_CU(cudaGetLastError());
  }
  SY_CU(cudaMemcpyAsync(s.host.p, s.y32.p, fbytes, cudaMemcpyDeviceToHost, eng.stream));
  SY_CU(cudaStreamSynchronize(eng.stream));
  for (size_t g = 0; g < gid.size(); ++g)
    std::memcpy(outputs[src[g]], s.host.as<float>() + int64_t(off[g]) * h, static_cast<size_t>(cnt[g] * h) * 4);
  return {};
}

void gpu_experts::set_gemm_mode(gemm_mode m) { impl_->engine.mode = m; }
void gpu_experts::set_gemv_tuning(gemv_tuning t) { impl_->engine.tuning = t; }
void gpu_experts::set_fused_tuning(fused_tuning t) { impl_->engine.fused = t; }
int gpu_experts::last_fused_cluster() const { return impl_->engine.last_cluster; }
gemm_mode gpu_experts::last_gemm_mode() const { return impl_->engine.last; }

// ---- gpu_moe_layer ----

struct gpu_moe_layer::impl {
  expert_engine engine;
  gating_config gating;
  dbuf router, bias, slot, logits, idx, w, counts, offsets, fill, pos, xs, yo, x_in, y_out;
  dbuf n_act, act, act_start, act_cnt, row_tok, yo32;  // the GEMV path's work list and outputs
  dbuf done;  // the fused router/routing kernel's finished-block counter (zero between launches)
  dbuf plan_tiles, tile_count;  // the device-planned fused path's tile list and its length
  bool device_plan = true;      // steps that can run `fused` without the counts plan it on the device
  dbuf router_bf;               // the router in bf16 pieces, [3][E, H]: hi, mid, lo (hi only when exact)
  bool router_exact = false;    // its weights are bf16 values (mid and lo zero)
  bool router_pass = false;     // and router_pass_kernel takes its shape on this device
  int router_pass_blocks = 0;   // router_pass_kernel's blocks that fit on the device at once
  gpu_moe_layer::router_gemm router_mode = gpu_moe_layer::router_gemm::automatic;
  int last_parts = 0;           // the last forward's router GEMM (last_router_parts)
  bool last_planned = false;    // the last forward did
  std::vector<int> slot_host;
  int local = 0;  // experts held here
  hbuf counts_host, offsets_host;
  int64_t last_t = 0;
  int last_active = 0;
  size_t last_bytes = 0;
  bool stats_on_device = false;  // the last forward's active-expert count is still on the device
  bool list_on_device = false;  // the last forward's expert list is on the device (n_act, act: the GEMV
                                // path, the device-planned fused path); else its counts are in counts_host
  static constexpr int read_tables = 4;
  dbuf read_tab[read_tables], sink;  // the same-bytes read baseline's chunk tables
  int read_chunks[read_tables] = {};
  int sms = 0;  // the device's SMs (sizes the read baseline's grid)
  cudaEvent_t ev[5] = {};  // while timing is on: around each forward [0, 1], around its expert GEMMs [2, 3],
                           // the counts made [4]
  bool experts_timed = false;
  bool timing = false, timed = false;
  ~impl() {
    for (auto e : ev)
      if (e) cudaEventDestroy(e);
  }
  std::vector<std::unique_ptr<dbuf>> scratch;
};

gpu_moe_layer::gpu_moe_layer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
gpu_moe_layer::~gpu_moe_layer() = default;

caf::expected<std::unique_ptr<gpu_moe_layer>> gpu_moe_layer::make(int device, const gating_config& gating,
                                                                  const matrix& router, const float* score_bias,
                                                                  std::span<const expert_weights* const> experts) {
  if (gating.num_experts > max_experts || gating.n_group > max_groups || gating.top_k > 32)
    return make_error(model_errc::unsupported, "gpu layer: at most " + std::to_string(max_experts) + " experts, " +
                                                   std::to_string(max_groups) + " groups and top-32");
  if (gating.top_k < 1 || gating.top_k > gating.num_experts)  // the gating kernels take k distinct experts
    return make_error(model_errc::invalid_argument, "gpu layer: top-k must be 1 to the expert count (" +
                                                        std::to_string(gating.num_experts) + "), got " +
                                                        std::to_string(gating.top_k));
  if (static_cast<int>(experts.size()) != gating.num_experts || router.rows() != gating.num_experts)
    return make_error(model_errc::invalid_argument, "gpu layer: router and expert list disagree on the expert count");
  const expert_weights* any = nullptr;
  for (auto* e : experts)
    if (e) any = e;
  const int64_t hidden = router.cols(), ffn = any ? any->ffn() : 1;
  auto p = std::make_unique<impl>();
  if (auto e = p->engine.init(device, hidden, ffn)) return e;
  p->gating = gating;
  p->slot_host.assign(static_cast<size_t>(gating.num_experts), -1);
  for (int e = 0; e < gating.num_experts; ++e)
    if (experts[static_cast<size_t>(e)]) {
      if (auto err = p->engine.add(e, *experts[static_cast<size_t>(e)])) return err;
      p->slot_host[static_cast<size_t>(e)] = e;
      ++p->local;
    }
  auto r = router.to_f32();
  if (auto err = p->router.reserve(r.size() * 4)) return err;
  if (auto err = p->slot.reserve(p->slot_host.size() * 4)) return err;
  {
    // The router's bf16 pieces for large steps' GEMM; only hi where the weights are bf16 values.
    std::vector<bf16> pieces(3 * r.size());
    p->router_exact = true;
    for (size_t i = 0; i < r.size(); ++i) {
      split3(r[i], pieces[i], pieces[r.size() + i], pieces[2 * r.size() + i]);
      p->router_exact = p->router_exact && r[i] - __bfloat162float(pieces[i]) == 0.0f;
    }
    const size_t bytes = (p->router_exact ? 1 : 3) * r.size() * 2;
    if (auto err = p->router_bf.reserve(bytes)) return err;
    if (const cudaError_t ce = cudaMemcpy(p->router_bf.p, pieces.data(), bytes, cudaMemcpyHostToDevice); ce != cudaSuccess)
      return cuda_fail("cudaMemcpy (router pieces)", ce);
    // A bf16 router's products in one pass over x (router_pass_kernel): mma.sync wants compute
    // capability 8.0 on, the kernel whole 64-wide chunks of H and a warp per 32 experts.
    int major = 0, sms = 0, per_sm = 0;
    const int experts_n = gating.num_experts;
    cudaFuncAttributes fa{};
    if (p->router_exact && experts_n <= router_pass_max_experts && hidden > 0 && hidden % router_pass_chunk == 0 &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8 &&
        cudaFuncGetAttributes(&fa, router_pass_kernel) == cudaSuccess && fa.ptxVersion >= 80 &&  // built with its body
        cudaFuncSetAttribute(router_pass_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, router_pass_smem) ==
            cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, router_pass_kernel, (experts_n + 31) / 32 * 32,
                                                      router_pass_smem) == cudaSuccess &&
        per_sm > 0) {
      p->router_pass = true;
      p->router_pass_blocks = sms * per_sm;
    }
    (void)cudaGetLastError();
  }
  {
    cudaError_t ce = cudaMemcpy(p->router.p, r.data(), r.size() * 4, cudaMemcpyHostToDevice);
    if (ce == cudaSuccess) ce = cudaMemcpy(p->slot.p, p->slot_host.data(), p->slot_host.size() * 4, cudaMemcpyHostToDevice);
    if (ce != cudaSuccess) return cuda_fail("cudaMemcpy (router, slots)", ce);
  }
  if (score_bias) {
    if (auto err = p->bias.reserve(static_cast<size_t>(gating.num_experts) * 4)) return err;
    cudaError_t ce = cudaMemcpy(p->bias.p, score_bias, static_cast<size_t>(gating.num_experts) * 4, cudaMemcpyHostToDevice);
    if (ce != cudaSuccess) return cuda_fail("cudaMemcpy (score bias)", ce);
  }
  if (auto err = p->done.reserve(sizeof(unsigned))) return err;
  if (const cudaError_t ce = cudaMemset(p->done.p, 0, sizeof(unsigned)); ce != cudaSuccess) return cuda_fail("cudaMemset", ce);
  if (auto err = p->counts_host.reserve(static_cast<size_t>(gating.num_experts) * 4)) return err;
  if (auto err = p->offsets_host.reserve(static_cast<size_t>(gating.num_experts) * 4)) return err;
  return std::unique_ptr<gpu_moe_layer>(new gpu_moe_layer(std::move(p)));
}

caf::error gpu_moe_layer::forward_device(const float* x, int64_t t, float* y) {
  auto& s = *impl_;
  s.timed = s.experts_timed = false;
  if (!s.timing) return forward_launch(x, t, y);
  SY_CU(cudaSetDevice(s.engine.device));
  for (auto& e : s.ev)
    if (!e) SY_CU(cudaEventCreate(&e));
  SY_CU(cudaEventRecord(s.ev[0], s.engine.stream));
  SY_TRY(forward_launch(x, t, y));
  SY_CU(cudaEventRecord(s.ev[1], s.engine.stream));
  s.timed = true;
  return {};
}

void gpu_moe_layer::set_timing(bool on) { impl_->timing = on; }

caf::expected<double> gpu_moe_layer::last_device_ms() {
  auto& s = *impl_;
  if (!s.timed) return make_error(model_errc::invalid_argument, "gpu layer: the last forward was not timed (set_timing)");
  SY_CU(cudaEventSynchronize(s.ev[1]));
  float ms = 0;
  SY_CU(cudaEventElapsedTime(&ms, s.ev[0], s.ev[1]));
  return static_cast<double>(ms);
}

caf::expected<gpu_moe_layer::phases> gpu_moe_layer::last_phases() {
  auto& s = *impl_;
  if (!s.timed || !s.experts_timed)
    return make_error(model_errc::invalid_argument,
                      "gpu layer: the last forward's phases were not timed (timing off, or the GEMV path ran)");
  SY_CU(cudaEventSynchronize(s.ev[1]));
  float ms[4] = {};
  SY_CU(cudaEventElapsedTime(&ms[0], s.ev[0], s.ev[2]));
  SY_CU(cudaEventElapsedTime(&ms[1], s.ev[2], s.ev[3]));
  SY_CU(cudaEventElapsedTime(&ms[2], s.ev[3], s.ev[1]));
  SY_CU(cudaEventElapsedTime(&ms[3], s.ev[0], s.ev[4]));
  return phases{ms[0], ms[1], ms[2], ms[3]};
}

caf::error gpu_moe_layer::forward_launch(const float* x, int64_t t, float* y) {
  auto& s = *impl_;
  auto& eng = s.engine;
  const auto& g = s.gating;
  const int64_t h = eng.hidden, e = g.num_experts, k = g.top_k, n = t * k;
  SY_CU(cudaSetDevice(eng.device));
  SY_TRY(s.logits.reserve(static_cast<size_t>(t * e) * 4));
  SY_TRY(s.idx.reserve(static_cast<size_t>(n) * 4));
  SY_TRY(s.w.reserve(static_cast<size_t>(n) * 4));
  SY_TRY(s.pos.reserve(static_cast<size_t>(n) * 4));
  SY_TRY(s.counts.reserve(static_cast<size_t>(e) * 4));
  SY_TRY(s.offsets.reserve(static_cast<size_t>(e) * 4));
  SY_TRY(s.fill.reserve(static_cast<size_t>(e) * 4));
  SY_TRY(s.xs.reserve(static_cast<size_t>(n * h) * 2));
  SY_TRY(s.yo.reserve(static_cast<size_t>(n * h) * 2));
  gate_params gp{static_cast<int>(e), static_cast<int>(k), g.n_group, g.topk_group,
                 g.scoring == scoring_func::sigmoid, static_cast<int>(g.method), g.norm_topk_prob,
                 g.scale_only_unnormalised, static_cast<float>(g.norm_eps), static_cast<float>(g.routed_scaling_factor)};
  s.last_t = t;
  s.last_planned = false;
  s.last_parts = 0;
  // Before any count reaches the host: t bounds every expert's rows, t·k over the local experts
  // is the mean the rule needs.
  const bool gemv = n <= gemv_max_pairs && eng.use_gemv(static_cast<int>(std::min<int64_t>(t, gemv_max_rows + 1)), n,
                                                        static_cast<size_t>(std::max(s.local, 1)));
  if (gemv) {
    // Small steps: routing, work list, experts and combine all on the device, no host round trip.
    if (t == 0) return {};
    SY_TRY(s.n_act.reserve(4));
    SY_TRY(s.act.reserve(static_cast<size_t>(e) * 4));
    SY_TRY(s.act_start.reserve(static_cast<size_t>(e) * 4));
    SY_TRY(s.act_cnt.reserve(static_cast<size_t>(e) * 4));
    SY_TRY(s.row_tok.reserve(static_cast<size_t>(n) * 4));
    SY_TRY(s.yo32.reserve(static_cast<size_t>(n * h) * 4));
    // Router logits in fp32 (no TF32), so expert choices match the CPU's; routing in the same launch.
    constexpr int per_block = gemv_max_rows / router_split;  // experts per block of the router logits
    const unsigned blocks = static_cast<unsigned>((e + per_block - 1) / per_block);
    auto launch = [&](auto kernel) {
      return launch_k(eng.gemv_overlap(), kernel, dim3(blocks), dim3(32 * gemv_max_rows), eng.stream, x, static_cast<int>(h),
                      s.router.as<float>(), s.bias.p ? s.bias.as<float>() : nullptr, gp, static_cast<int>(t),
                      s.slot.as<int>(), s.logits.as<float>(), s.done.as<unsigned>(), s.idx.as<int>(), s.w.as<float>(),
                      s.pos.as<int>(), s.n_act.as<int>(), s.act.as<int>(), s.act_start.as<int>(), s.act_cnt.as<int>(),
                      s.row_tok.as<int>());
    };
    if (t == 1) SY_CU((launch(router_route_small_kernel<1>)));
    else if (t <= 2) SY_CU((launch(router_route_small_kernel<2>)));
    else if (t <= 4) SY_CU((launch(router_route_small_kernel<4>)));
    else SY_CU((launch(router_route_small_kernel<gemv_max_rows>)));
    const gemv_work wk{s.n_act.as<int>(), s.act.as<int>(), s.act_start.as<int>(), s.act_cnt.as<int>(), s.row_tok.as<int>()};
    SY_TRY(eng.gemv(x, wk, static_cast<int>(std::min<int64_t>(s.local, n)), static_cast<int>(t), n, s.yo32.as<float>()));
    SY_CU((launch_k(eng.gemv_overlap(), combine_kernel<float>, dim3(static_cast<unsigned>(t), static_cast<unsigned>((h + 255) / 256)),
                   dim3(256), eng.stream, s.yo32.as<const float>(), s.pos.as<const int>(), s.w.as<const float>(),
                   static_cast<int>(k), h, y)));
    s.stats_on_device = true;
    s.list_on_device = true;
    return {};
  }
  s.stats_on_device = false;
  // Router logits as an f32 GEMM gives them, so expert choices match the CPU: in bf16 pieces on the
  // tensor cores, or cublasSgemm in true f32 (the default math mode, no TF32); set_router_gemm.
  const float one = 1.0f, zero = 0.0f;
  // Decided before any count: whether this step runs fused with its tile list made on the device.
  const bool planned = s.device_plan && eng.fused_without_counts(t, k, s.local, e);
  const bool split = s.router_mode == router_gemm::bf16_pieces ||
                     (s.router_mode == router_gemm::automatic && s.router_exact && planned && t >= router_pieces_from);
  const int parts = split ? (s.router_exact ? 3 : 6) : 1;
  int slices = parts;  // the logits' slices the gating sums (the one-pass kernel sums its products itself)
  s.last_parts = parts;
  // The fused kernels' bf16 copy of x (one copy, read through row_tok): the split's hi piece, or made here.
  auto bf16_copy_of_x = [&]() -> caf::error {
    if (split) return {};
    f32_to_bf16_kernel<<<blocks_for(convert_threads(t * h)), 256, 0, eng.stream>>>(x, s.xs.as<bf16>(), t * h);
    SY_CU(cudaGetLastError());
    return {};
  };
  if (split) {
    // x's hi piece in xs is the bf16 copy of x the fused path reads, so it skips its own
    // conversion below.
    SY_TRY(s.xs.reserve(static_cast<size_t>(std::max(n, 3 * t) * h) * 2));
    const bf16* rb = s.router_bf.as<bf16>();
    if (s.router_pass && t > 0 && aligned16(x) && aligned16(s.xs.p)) {
      // A bf16 router: the three products in one pass, x's hi piece into xs. H in as many ranges
      // (each its own slice of the logits) as fill the device in one wave of blocks.
      const int64_t blocks = (t + router_pass_tokens - 1) / router_pass_tokens, chunks = h / router_pass_chunk;
      const int ranges = static_cast<int>(
          std::clamp<int64_t>(s.router_pass_blocks / blocks, 1, std::min<int64_t>(router_pass_max_splits, chunks)));
      SY_TRY(s.logits.reserve(static_cast<size_t>(std::max(parts, ranges) * t * e) * 4));
      router_pass_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(ranges)),
                           static_cast<unsigned>((e + 31) / 32 * 32), router_pass_smem, eng.stream>>>(
          x, t, static_cast<int>(h), rb, static_cast<int>(e), s.logits.as<float>(), s.xs.as<bf16>());
      SY_CU(cudaGetLastError());
      slices = ranges;
    } else {
      // x's three pieces in xs (3 blocks of t·h); slices of the logits: x hi, mid, lo times router
      // hi; then x hi, mid times router mid; x hi times router lo (the products f32 resolves).
      SY_TRY(s.logits.reserve(static_cast<size_t>(parts * t * e) * 4));
      split3_kernel<<<blocks_for(convert_threads(t * h)), 256, 0, eng.stream>>>(x, s.xs.as<bf16>(), t * h);
      SY_CU(cudaGetLastError());
      auto products = [&](int piece, int x_pieces, int slice) {
        return cublasGemmStridedBatchedEx(eng.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(e), static_cast<int>(t),
                                          static_cast<int>(h), &one, rb + piece * e * h, CUDA_R_16BF, static_cast<int>(h), 0,
                                          s.xs.as<bf16>(), CUDA_R_16BF, static_cast<int>(h), t * h, &zero,
                                          s.logits.as<float>() + slice * t * e, CUDA_R_32F, static_cast<int>(e), t * e,
                                          x_pieces, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      };
      SY_CUBLAS(products(0, 3, 0));
      if (!s.router_exact) {
        SY_CUBLAS(products(1, 2, 3));
        SY_CUBLAS(products(2, 1, 5));
      }
    }
  } else {
    SY_CUBLAS(cublasSgemm(eng.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(e), static_cast<int>(t), static_cast<int>(h),
                          &one, s.router.as<float>(), static_cast<int>(h), x, static_cast<int>(h), &zero,
                          s.logits.as<float>(), static_cast<int>(e)));
  }
  // Gating to the GEMMs, kernel after kernel: each may launch while the one before drains
  // (programmatic dependent launch), waiting for it before it reads what that one wrote.
  const bool pdl = eng.overlap();
  SY_CU((launch_k(pdl, gate_kernel, dim3(blocks_for(t, gate_block_warps)), dim3(32 * gate_block_warps), eng.stream,
                  s.logits.as<float>(), slices, s.bias.p ? s.bias.as<float>() : nullptr, gp, t, s.idx.as<int>(),
                  s.w.as<float>(), s.counts.as<int>())));
  SY_CU((launch_k(pdl, count_kernel, dim3(blocks_for(n)), dim3(256), eng.stream, s.idx.as<int>(), n, s.slot.as<int>(),
                  s.counts.as<int>())));
  if (s.timing) SY_CU(cudaEventRecord(s.ev[4], eng.stream));
  if (planned) {
    // Our kernels read their tile list's length from the device: plan, scatter, convert, run and
    // combine without the counts' trip to the host.
    const int64_t rows_most = n;
    const int cluster = eng.planned_cluster(n, static_cast<int>(e));
    const int tiles_most = static_cast<int>(n / moe_tile_rows + cluster * std::min<int64_t>(s.local, n));
    SY_TRY(s.plan_tiles.reserve(static_cast<size_t>(tiles_most) * sizeof(moe_tile)));
    SY_TRY(s.tile_count.reserve(sizeof(int)));
    SY_TRY(s.n_act.reserve(sizeof(int)));
    SY_TRY(s.act.reserve(static_cast<size_t>(e) * 4));
    SY_TRY(s.row_tok.reserve(static_cast<size_t>(n) * 4));
    SY_CU((launch_k(pdl, plan_kernel, dim3(1), dim3(max_experts), eng.stream, s.counts.as<int>(), static_cast<int>(e),
                    cluster, s.offsets.as<int>(), s.fill.as<int>(), s.plan_tiles.as<moe_tile>(), s.tile_count.as<int>(),
                    s.n_act.as<int>(), s.act.as<int>())));
    SY_CU((launch_k(pdl, scatter_kernel, dim3(blocks_for(n)), dim3(256), eng.stream, s.idx.as<int>(), n,
                    s.slot.as<int>(), s.offsets.as<int>(), s.fill.as<int>(), s.pos.as<int>(), s.row_tok.as<int>(),
                    static_cast<int>(k))));
    SY_TRY(bf16_copy_of_x());
    if (s.timing) SY_CU(cudaEventRecord(s.ev[2], eng.stream));
    SY_TRY(eng.compute_fused_planned(cluster, s.plan_tiles.as<const moe_tile>(), s.tile_count.as<const int>(), tiles_most,
                                     s.xs.as<bf16>(), s.row_tok.as<int>(), rows_most, s.yo.as<bf16>()));
    if (s.timing) {
      SY_CU(cudaEventRecord(s.ev[3], eng.stream));
      s.experts_timed = true;
    }
    SY_TRY(combine(s, t, y));
    s.stats_on_device = true;
    s.list_on_device = true;
    s.last_planned = true;
    return {};
  }
  // The GEMM launches take their sizes on the host: one small copy per layer.
  SY_CU(cudaMemcpyAsync(s.counts_host.p, s.counts.p, static_cast<size_t>(e) * 4, cudaMemcpyDeviceToHost, eng.stream));
  SY_CU(cudaStreamSynchronize(eng.stream));
  const int* counts = s.counts_host.as<int>();
  int* offsets = s.offsets_host.as<int>();  // pinned: its copy runs after this function returns
  std::vector<int> ids, off, cnt;
  for (int i = 0; i < e; ++i)
    if (counts[i] > 0) {
      ids.push_back(i);
      cnt.push_back(counts[i]);
    }
  const bool fused = eng.use_fused(cnt);
  const bool padded = eng.use_padded(cnt);  // never where fused runs
  const int mpad = padded ? expert_engine::padded_rows(cnt) : 0;
  int rows = 0;
  for (int i = 0; i < e; ++i) {
    offsets[i] = rows;
    if (counts[i] > 0) {
      off.push_back(rows);
      rows += padded ? mpad : counts[i];
    }
  }
  s.last_active = static_cast<int>(ids.size());
  s.last_bytes = ids.size() * static_cast<size_t>(3 * h * eng.ffn) * 2;
  s.list_on_device = false;
  if (padded) {  // the stream is idle: growing the buffers is safe
    SY_TRY(s.xs.reserve(static_cast<size_t>(rows * h) * 2));
    SY_TRY(s.yo.reserve(static_cast<size_t>(rows * h) * 2));
  }
  SY_CU(cudaMemcpyAsync(s.offsets.p, offsets, static_cast<size_t>(e) * 4, cudaMemcpyHostToDevice, eng.stream));
  SY_CU(cudaMemsetAsync(s.fill.p, 0, static_cast<size_t>(e) * 4, eng.stream));
  if (fused) SY_TRY(s.row_tok.reserve(static_cast<size_t>(std::max<int64_t>(n, 1)) * 4));
  scatter_kernel<<<blocks_for(n), 256, 0, eng.stream>>>(s.idx.as<int>(), n, s.slot.as<int>(), s.offsets.as<int>(),
                                                        s.fill.as<int>(), s.pos.as<int>(),
                                                        fused ? s.row_tok.as<int>() : nullptr, static_cast<int>(k));
  SY_CU(cudaGetLastError());
  if (fused) {
    SY_TRY(bf16_copy_of_x());
  } else if (n > 0) {
    gather_kernel<<<static_cast<unsigned>(n), 256, 0, eng.stream>>>(x, h, s.pos.as<int>(), static_cast<int>(k), s.xs.as<bf16>());
    SY_CU(cudaGetLastError());
  }
  if (s.timing) SY_CU(cudaEventRecord(s.ev[2], eng.stream));
  if (fused)
    SY_TRY(eng.compute_fused(ids, off, cnt, s.xs.as<bf16>(), s.row_tok.as<int>(), rows, s.yo.as<bf16>()));
  else if (padded)
    SY_TRY(eng.compute_padded(ids, mpad, s.xs.as<bf16>(), s.yo.as<bf16>()));
  else
    SY_TRY(eng.compute(ids, off, cnt, s.xs.as<bf16>(), rows, s.yo.as<bf16>()));
  if (s.timing) {
    SY_CU(cudaEventRecord(s.ev[3], eng.stream));
    s.experts_timed = true;
  }
  return combine(s, t, y);
}

caf::error gpu_moe_layer::combine(impl& s, int64_t t, float* y) {
  const int64_t h = s.engine.hidden, k = s.gating.top_k;
  if (t <= 0) return {};
  // After our fused kernels it may start as the down kernel drains (programmatic dependent launch).
  const bool pdl = s.engine.last == gemm_mode::fused && s.engine.overlap();
  if (h % 8 == 0 && aligned16(y) && aligned16(s.yo.p))
    SY_CU((launch_k(pdl, combine8_kernel, dim3(static_cast<unsigned>(t), static_cast<unsigned>((h / 8 + 255) / 256)),
                    dim3(256), s.engine.stream, s.yo.as<bf16>(), s.pos.as<int>(), s.w.as<float>(), static_cast<int>(k), h,
                    y)));
  else
    combine_kernel<bf16><<<dim3(static_cast<unsigned>(t), static_cast<unsigned>((h + 255) / 256)), 256, 0, s.engine.stream>>>(
        s.yo.as<bf16>(), s.pos.as<int>(), s.w.as<float>(), static_cast<int>(k), h, y);
  SY_CU(cudaGetLastError());
  return {};
}

caf::error gpu_moe_layer::forward(const float* x, int64_t t, float* y) {
  auto& s = *impl_;
  const size_t bytes = static_cast<size_t>(t * s.engine.hidden) * 4;
  SY_CU(cudaSetDevice(s.engine.device));
  SY_TRY(s.x_in.reserve(bytes));
  SY_TRY(s.y_out.reserve(bytes));
  SY_CU(cudaMemcpyAsync(s.x_in.p, x, bytes, cudaMemcpyHostToDevice, s.engine.stream));
  SY_TRY(forward_device(s.x_in.as<float>(), t, s.y_out.as<float>()));
  SY_CU(cudaMemcpyAsync(y, s.y_out.p, bytes, cudaMemcpyDeviceToHost, s.engine.stream));
  SY_CU(cudaStreamSynchronize(s.engine.stream));
  return {};
}

void gpu_moe_layer::set_gemm_mode(gemm_mode m) { impl_->engine.mode = m; }
void gpu_moe_layer::set_device_plan(bool on) { impl_->device_plan = on; }
void gpu_moe_layer::set_router_gemm(router_gemm g) { impl_->router_mode = g; }
int gpu_moe_layer::last_router_parts() const { return impl_->last_parts; }
void gpu_moe_layer::set_fused_tuning(fused_tuning t) { impl_->engine.fused = t; }
int gpu_moe_layer::last_fused_cluster() const { return impl_->engine.last_cluster; }
bool gpu_moe_layer::last_device_planned() const { return impl_->last_planned; }
void gpu_moe_layer::set_gemv_tuning(gemv_tuning t) { impl_->engine.tuning = t; }
gemm_mode gpu_moe_layer::last_gemm_mode() const { return impl_->engine.last; }

caf::error gpu_moe_layer::synchronize() {
  SY_CU(cudaStreamSynchronize(impl_->engine.stream));
  return {};
}

caf::expected<routing> gpu_moe_layer::last_routing() {
  auto& s = *impl_;
  routing r;
  r.tokens = s.last_t;
  r.top_k = s.gating.top_k;
  r.experts.resize(static_cast<size_t>(r.tokens * r.top_k));
  r.weights.resize(r.experts.size());
  SY_CU(cudaStreamSynchronize(s.engine.stream));
  if (!r.experts.empty()) {
    cudaError_t ce = cudaMemcpy(r.experts.data(), s.idx.p, r.experts.size() * 4, cudaMemcpyDeviceToHost);
    if (ce == cudaSuccess) ce = cudaMemcpy(r.weights.data(), s.w.p, r.weights.size() * 4, cudaMemcpyDeviceToHost);
    if (ce != cudaSuccess) return cuda_fail("cudaMemcpy (routing)", ce);
  }
  return r;
}

namespace {
/// Brings the GEMV path's active-expert count back from the device (after the forward is done).
void settle_stats(gpu_moe_layer::impl& s) {
  if (!s.stats_on_device) return;
  int na = 0;
  if (cudaStreamSynchronize(s.engine.stream) != cudaSuccess ||
      cudaMemcpy(&na, s.n_act.p, sizeof na, cudaMemcpyDeviceToHost) != cudaSuccess)
    na = -1;  // reported as-is: the next call on the stream reports the error
  s.last_active = na;
  s.last_bytes = na > 0 ? static_cast<size_t>(na) * static_cast<size_t>(3 * s.engine.hidden * s.engine.ffn) * 2 : 0;
  s.stats_on_device = false;
}
}  // namespace

int gpu_moe_layer::last_active_experts() const {
  settle_stats(*impl_);
  return impl_->last_active;
}
size_t gpu_moe_layer::last_weight_bytes() const {
  settle_stats(*impl_);
  return impl_->last_bytes;
}

caf::expected<size_t> gpu_moe_layer::prepare_read_baseline(int table) {
  auto& s = *impl_;
  auto& eng = s.engine;
  if (table < 0 || table >= impl::read_tables)
    return make_error(model_errc::invalid_argument, "gpu layer: read baseline table " + std::to_string(table));
  SY_CU(cudaSetDevice(eng.device));
  SY_CU(cudaStreamSynchronize(eng.stream));
  std::vector<int> ids;
  if (!s.list_on_device) {
    for (int e = 0; e < s.gating.num_experts; ++e)
      if (s.counts_host.as<int>()[e] > 0) ids.push_back(e);  // as the forward listed them
  } else {
    int na = 0;
    SY_CU(cudaMemcpy(&na, s.n_act.p, sizeof na, cudaMemcpyDeviceToHost));
    ids.assign(static_cast<size_t>(std::max(na, 0)), 0);
    if (na > 0) SY_CU(cudaMemcpy(ids.data(), s.act.p, ids.size() * sizeof(int), cudaMemcpyDeviceToHost));
  }
  std::vector<read_chunk> chunks;
  size_t bytes = 0;
  auto add = [&](const dbuf& m, size_t len) {
    const auto* p = m.as<const uint4>();
    const int64_t words = static_cast<int64_t>(len / 16);
    for (int64_t i = 0; i < words; i += read_chunk_words)
      chunks.push_back({p + i, static_cast<int>(std::min<int64_t>(read_chunk_words, words - i))});
    bytes += len;
  };
  const size_t mat = static_cast<size_t>(eng.hidden * eng.ffn) * 2;  // one [F, H] matrix in bf16
  for (int id : ids) {
    const auto& w = *eng.experts.at(id);
    add(w.gate_up, 2 * mat);
    add(w.down, mat);
  }
  SY_TRY(s.read_tab[table].reserve(std::max<size_t>(chunks.size(), 1) * sizeof(read_chunk)));
  SY_TRY(s.sink.reserve(sizeof(unsigned)));
  if (!chunks.empty())
    SY_CU(cudaMemcpy(s.read_tab[table].p, chunks.data(), chunks.size() * sizeof(read_chunk), cudaMemcpyHostToDevice));
  s.read_chunks[table] = static_cast<int>(chunks.size());
  SY_CU(cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, eng.device));
  return bytes;
}

caf::error gpu_moe_layer::read_baseline(int table, int blocks_per_sm) {
  auto& s = *impl_;
  if (table < 0 || table >= impl::read_tables || s.read_chunks[table] == 0) return {};
  const int n = s.read_chunks[table];
  const int grid = blocks_per_sm > 0 ? std::min(n, s.sms * blocks_per_sm) : n;
  read_chunks_kernel<<<static_cast<unsigned>(grid), 256, 0, s.engine.stream>>>(s.read_tab[table].as<read_chunk>(), n,
                                                                               s.sink.as<unsigned>());
  SY_CU(cudaGetLastError());
  return {};
}

caf::expected<float*> gpu_moe_layer::device_alloc(size_t elems) {
  SY_CU(cudaSetDevice(impl_->engine.device));
  auto b = std::make_unique<dbuf>();
  if (auto e = b->reserve(elems * 4)) return e;
  float* p = b->as<float>();
  impl_->scratch.push_back(std::move(b));
  return p;
}

caf::error gpu_moe_layer::upload(float* dst, const float* src, size_t elems) {
  SY_CU(cudaMemcpy(dst, src, elems * 4, cudaMemcpyHostToDevice));
  return {};
}

// ---- executor ----

caf::expected<std::unique_ptr<gpu_expert_executor>> gpu_expert_executor::make(int device,
                                                                              const std::vector<layer_experts>& layers) {
  auto ex = std::unique_ptr<gpu_expert_executor>(new gpu_expert_executor());
  for (const auto& l : layers) {
    const expert_weights* any = nullptr;
    for (auto& e : l.experts)
      if (e) any = e.get();
    if (!any) {
      ex->layers_.push_back(nullptr);
      continue;
    }
    auto g = gpu_experts::make(device, any->hidden(), any->ffn());
    if (!g) return g.error();
    for (size_t e = 0; e < l.experts.size(); ++e)
      if (l.experts[e])
        if (auto err = (*g)->add_expert(static_cast<int>(e), *l.experts[e])) return err;
    ex->layers_.push_back(std::move(*g));
  }
  return ex;
}

caf::error gpu_expert_executor::run(int layer, const dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                                    std::vector<std::vector<float>>& outputs) {
  if (layer < 0 || static_cast<size_t>(layer) >= layers_.size() || !layers_[static_cast<size_t>(layer)])
    return make_error(model_errc::invalid_argument, "gpu executor: no experts for layer " + std::to_string(layer));
  auto& g = *layers_[static_cast<size_t>(layer)];
  std::vector<int> ids;
  std::vector<const float*> in;
  std::vector<int64_t> n;
  std::vector<float*> out;
  outputs.resize(plan.batches.size());
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    ids.push_back(plan.batches[i].expert);
    n.push_back(static_cast<int64_t>(plan.batches[i].tokens.size()));
    in.push_back(inputs[i].data());
    outputs[i].resize(inputs[i].size());
    out.push_back(outputs[i].data());
  }
  return g.run(ids, in, n, out);
}

// ---- an expert host's device ----

namespace {
class cuda_device_experts final : public device_experts {
 public:
  explicit cuda_device_experts(int device) : device_(device) {}
  caf::error add(int layer, int expert, const expert_weights& w) override {
    std::lock_guard lock(mu_);
    auto& g = layers_[layer];
    if (!g) {
      auto made = gpu_experts::make(device_, w.hidden(), w.ffn());
      if (!made) return made.error();
      g = std::move(*made);
    }
    return g->add_expert(expert, w);
  }
  void remove(int layer, int expert) override {
    std::lock_guard lock(mu_);
    if (auto it = layers_.find(layer); it != layers_.end()) it->second->remove_expert(expert);
  }
  caf::error run(int layer, std::span<const int> experts, std::span<const float* const> inputs,
                 std::span<const int64_t> rows, std::span<float* const> outputs) override {
    std::lock_guard lock(mu_);
    auto it = layers_.find(layer);
    if (it == layers_.end())
      return make_error(model_errc::invalid_argument, "cuda:" + std::to_string(device_) + ": no experts of layer " +
                                                          std::to_string(layer));
    return it->second->run(experts, inputs, rows, outputs);
  }
  std::string describe() const override {
    return "cuda:" + std::to_string(device_) + " (" + device_description(device_) + ")";
  }

 private:
  int device_;
  std::mutex mu_;
  std::map<int, std::unique_ptr<gpu_experts>> layers_;
};
}  // namespace

caf::expected<std::shared_ptr<device_experts>> make_device_experts(int device) {
  std::string why;
  if (!device_available(&why)) return make_error(model_errc::unsupported, "cuda:" + std::to_string(device) + ": " + why);
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || device < 0 || device >= n)
    return make_error(model_errc::invalid_argument,
                      "cuda:" + std::to_string(device) + ": no such device (" + std::to_string(n) + " present)");
  return std::shared_ptr<device_experts>(std::make_shared<cuda_device_experts>(device));
}

// ---- roofline ----

caf::expected<roofline> measure_roofline(int device) {
  SY_CU(cudaSetDevice(device));
  roofline r;
  cudaStream_t st;
  SY_CU(cudaStreamCreate(&st));
  cudaEvent_t a, b;
  SY_CU(cudaEventCreate(&a));
  SY_CU(cudaEventCreate(&b));
  auto median = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  {
    const size_t bytes = size_t{2} << 30;
    dbuf src, dst;
    if (auto e = src.reserve(bytes)) return e;
    if (auto e = dst.reserve(bytes)) return e;
    fill_kernel<<<4096, 256, 0, st>>>(src.as<bf16>(), static_cast<int64_t>(bytes / 2), 1, 1.0f);
    std::vector<float> ms;
    for (int i = 0; i < 12; ++i) {
      SY_CU(cudaEventRecord(a, st));
      SY_CU(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, st));
      SY_CU(cudaEventRecord(b, st));
      SY_CU(cudaEventSynchronize(b));
      float t;
      SY_CU(cudaEventElapsedTime(&t, a, b));
      if (i >= 2) ms.push_back(t);
    }
    r.copy_gbs = 2.0 * static_cast<double>(bytes) / (median(ms) * 1e-3) * 1e-9;
  }
  {
    const int n = 8192;
    dbuf A, B, C;
    const size_t bytes = static_cast<size_t>(n) * n * 2;
    if (auto e = A.reserve(bytes)) return e;
    if (auto e = B.reserve(bytes)) return e;
    if (auto e = C.reserve(bytes)) return e;
    fill_kernel<<<4096, 256, 0, st>>>(A.as<bf16>(), int64_t(n) * n, 2, 1.0f);
    fill_kernel<<<4096, 256, 0, st>>>(B.as<bf16>(), int64_t(n) * n, 3, 1.0f);
    cublasHandle_t h;
    SY_CUBLAS(cublasCreate(&h));
    cublasSetStream(h, st);
    const float one = 1.0f, zero = 0.0f;
    std::vector<float> ms;
    for (int i = 0; i < 12; ++i) {
      SY_CU(cudaEventRecord(a, st));
      const auto s2 = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, A.p, CUDA_R_16BF, n, B.p, CUDA_R_16BF, n, &zero,
                                   C.p, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (s2 != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(h);
        return blas_fail("cublasGemmEx (roofline)", s2);
      }
      SY_CU(cudaEventRecord(b, st));
      SY_CU(cudaEventSynchronize(b));
      float t;
      SY_CU(cudaEventElapsedTime(&t, a, b));
      if (i >= 2) ms.push_back(t);
    }
    cublasDestroy(h);
    r.bf16_tflops = 2.0 * n * double(n) * n / (median(ms) * 1e-3) * 1e-12;
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaStreamDestroy(st);
  return r;
}

}  // namespace sy::model::cuda
