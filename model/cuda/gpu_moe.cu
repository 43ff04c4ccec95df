#include "model/cuda/gpu_moe.hpp"

#include "model/error.hpp"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
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
    if (p) cudaFree(p);
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

__global__ void f32_to_bf16_kernel(const float* in, bf16* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

__global__ void bf16_to_f32_kernel(const bf16* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

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

constexpr int max_experts = 512;
constexpr int max_groups = 64;

struct gate_params {
  int experts, k, n_group, topk_group;
  int sigmoid, method, norm, scale_only_unnormalised;
  float norm_eps, scale;
};

/// One thread per token: scores, optional bias and group limit, top-k (ties to the lower id, in
/// rank order), weights — the same rule as the CPU's `route_from_logits`.
__global__ void gate_kernel(const float* logits, const float* bias, gate_params p, int64_t t, int* out_idx,
                            float* out_w) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= t) return;
  const float* l = logits + row * p.experts;
  float scores[max_experts], choice[max_experts];
  if (p.sigmoid) {
    for (int i = 0; i < p.experts; ++i) scores[i] = 1.0f / (1.0f + expf(-l[i]));
  } else {
    float m = l[0];
    for (int i = 1; i < p.experts; ++i) m = fmaxf(m, l[i]);
    double s = 0;
    for (int i = 0; i < p.experts; ++i) {
      scores[i] = expf(l[i] - m);
      s += scores[i];
    }
    const float inv = static_cast<float>(1.0 / s);
    for (int i = 0; i < p.experts; ++i) scores[i] *= inv;
  }
  for (int i = 0; i < p.experts; ++i) choice[i] = scores[i] + (bias ? bias[i] : 0.0f);
  if (p.method != 0 && p.n_group > 1) {
    const int per = p.experts / p.n_group;
    float gs[max_groups];
    bool keep[max_groups];
    for (int g = 0; g < p.n_group; ++g) {
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
      keep[g] = false;
    }
    for (int j = 0; j < p.topk_group; ++j) {
      int arg = -1;
      for (int g = 0; g < p.n_group; ++g)
        if (!keep[g] && (arg < 0 || gs[g] > gs[arg])) arg = g;
      keep[arg] = true;
    }
    for (int i = 0; i < p.experts; ++i)
      if (!keep[i / per]) choice[i] = 0.0f;
  }
  int* idx = out_idx + row * p.k;
  float* w = out_w + row * p.k;
  double sum = 0;
  for (int j = 0; j < p.k; ++j) {
    int arg = 0;
    for (int i = 1; i < p.experts; ++i)
      if (choice[i] > choice[arg]) arg = i;
    idx[j] = arg;
    w[j] = scores[arg];
    sum += scores[arg];
    choice[arg] = -INFINITY;
  }
  const bool normalise = p.norm && !(p.scale_only_unnormalised && p.k == 1);
  if (normalise)
    for (int j = 0; j < p.k; ++j) w[j] = static_cast<float>(w[j] / (sum + p.norm_eps));
  if (p.scale != 1.0f && !(normalise && p.scale_only_unnormalised))
    for (int j = 0; j < p.k; ++j) w[j] = static_cast<float>(static_cast<double>(w[j]) * p.scale);
}

__global__ void count_kernel(const int* idx, int64_t n, const int* slot, int* counts) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (slot[idx[i]] >= 0) atomicAdd(&counts[idx[i]], 1);
}

__global__ void scatter_kernel(const int* idx, int64_t n, const int* slot, const int* offsets, int* fill, int* pos) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int e = idx[i];
    pos[i] = slot[e] >= 0 ? offsets[e] + atomicAdd(&fill[e], 1) : -1;
  }
}

/// Row i of the routing (token i / k) goes to row pos[i] of the expert-sorted input, as bf16.
__global__ void gather_kernel(const float* x, int64_t h, const int* pos, int k, bf16* xs) {
  const int64_t i = blockIdx.x;
  const int p = pos[i];
  if (p < 0) return;
  const float* src = x + (i / k) * h;
  bf16* dst = xs + int64_t(p) * h;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) dst[c] = __float2bfloat16(src[c]);
}

/// h = silu(gate) · up over rows of [gate | up] (bf16 in, fp32 math, bf16 out).
__global__ void swiglu_kernel(const bf16* gu, int64_t rows, int64_t f, bf16* out) {
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / f, c = i - r * f;
    const float g = __bfloat162float(gu[r * 2 * f + c]), u = __bfloat162float(gu[r * 2 * f + f + c]);
    out[i] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
  }
}

/// y[t] = Σ_j w[t, j] · yo[pos[t, j]] (rows of absent experts skipped), fp32 accumulation.
__global__ void combine_kernel(const bf16* yo, const int* pos, const float* w, int k, int64_t h, float* y) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int p = pos[t * k + j];
      if (p >= 0) acc += w[t * k + j] * __bfloat162float(yo[int64_t(p) * h + c]);
    }
    y[t * h + c] = acc;
  }
}

/// A device's expert weights and the grouped-GEMM machinery shared by both public classes.
struct expert_engine {
  int device = 0;
  int64_t hidden = 0, ffn = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  bool grouped_ok = true;  ///< cleared when the library refuses the grouped call (then one GEMM per expert)
  gemm_mode mode = gemm_mode::automatic;
  int calls = 0;           ///< grouped calls since the stream was last idle: picks the pointer buffer
  struct weights {
    dbuf gate_up, down;  // bf16 [2F, H], [H, F]
  };
  std::map<int, std::unique_ptr<weights>> experts;
  dbuf gu, h;  // scratch
  dbuf ptrs[2];  // device pointer arrays of the two grouped calls of a forward
  hbuf host_ptrs[2];

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
    return {};
  }

  size_t bytes() const { return experts.size() * static_cast<size_t>(3 * hidden * ffn) * 2; }

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
    const bool few_large = groups <= 16 && (static_cast<int64_t>(m) * k >= (int64_t{16} << 20));
    const bool use_grouped = mode == gemm_mode::grouped || (mode == gemm_mode::automatic && !few_large);
    if (grouped_ok && use_grouped) {
      std::vector<cublasOperation_t> ta(static_cast<size_t>(groups), CUBLAS_OP_T), tb(static_cast<size_t>(groups), CUBLAS_OP_N);
      std::vector<int> ms(static_cast<size_t>(groups), m), ks(static_cast<size_t>(groups), k), ldas(static_cast<size_t>(groups), lda),
          ldbs(static_cast<size_t>(groups), ldb), ldcs(static_cast<size_t>(groups), ldc), sizes(static_cast<size_t>(groups), 1);
      std::vector<float> alpha(static_cast<size_t>(groups), 1.0f), beta(static_cast<size_t>(groups), 0.0f);
      // The pointer arrays must live in device memory.
      // The two grouped calls of a forward use their own buffers; the forward starts with the stream
      // idle, so neither buffer can still feed an earlier copy.
      const size_t pbytes = static_cast<size_t>(groups) * sizeof(void*);
      auto& hptr = host_ptrs[calls % 2];
      auto& dptr = ptrs[calls % 2];
      ++calls;
      SY_TRY(hptr.reserve(3 * pbytes));
      SY_TRY(dptr.reserve(3 * pbytes));
      auto** hp = hptr.as<const void*>();
      for (int g = 0; g < groups; ++g) {
        hp[g] = a[static_cast<size_t>(g)];
        hp[groups + g] = b[static_cast<size_t>(g)];
        hp[2 * groups + g] = c[static_cast<size_t>(g)];
      }
      SY_CU(cudaMemcpyAsync(dptr.p, hptr.p, 3 * pbytes, cudaMemcpyHostToDevice, stream));
      auto** dp = dptr.as<void*>();
      const auto st = cublasGemmGroupedBatchedEx(blas, ta.data(), tb.data(), ms.data(), n.data(), ks.data(), alpha.data(),
                                                 const_cast<const void* const*>(dp), CUDA_R_16BF, ldas.data(),
                                                 const_cast<const void* const*>(dp + groups), CUDA_R_16BF, ldbs.data(),
                                                 beta.data(), dp + 2 * groups, CUDA_R_16BF, ldcs.data(), groups,
                                                 sizes.data(), CUBLAS_COMPUTE_32F);
      if (st == CUBLAS_STATUS_SUCCESS) return {};
      if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) return blas_fail("cublasGemmGroupedBatchedEx", st);
      grouped_ok = false;
    }
    const float alpha = 1.0f, beta = 0.0f;
    for (int g = 0; g < groups; ++g)
      SY_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n[static_cast<size_t>(g)], k, &alpha, a[static_cast<size_t>(g)],
                             CUDA_R_16BF, lda, b[static_cast<size_t>(g)], CUDA_R_16BF, ldb, &beta, c[static_cast<size_t>(g)],
                             CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return {};
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
    swiglu_kernel<<<blocks_for(total_rows * ffn), 256, 0, stream>>>(gu.as<bf16>(), total_rows, ffn, h.as<bf16>());
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
  dbuf x32, xs, yo, y32;
  hbuf host;
};

gpu_experts::gpu_experts(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
gpu_experts::~gpu_experts() = default;

caf::expected<std::unique_ptr<gpu_experts>> gpu_experts::make(int device, int64_t hidden, int64_t ffn) {
  auto p = std::make_unique<impl>();
  if (auto e = p->engine.init(device, hidden, ffn)) return e;
  return std::unique_ptr<gpu_experts>(new gpu_experts(std::move(p)));
}

caf::error gpu_experts::add_expert(int id, const expert_weights& w) { return impl_->engine.add(id, w); }
bool gpu_experts::holds(int id) const { return impl_->engine.experts.count(id) > 0; }
size_t gpu_experts::device_bytes() const { return impl_->engine.bytes(); }

caf::error gpu_experts::run(std::span<const int> ids, std::span<const float* const> inputs, std::span<const int64_t> n,
                            std::span<float* const> outputs) {
  auto& eng = impl_->engine;
  auto& s = *impl_;
  const int64_t h = eng.hidden;
  std::vector<int> gid, off, cnt;
  int64_t rows = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!holds(ids[i]))
      return make_error(model_errc::invalid_argument, "gpu experts: expert " + std::to_string(ids[i]) + " is not held here");
    if (n[i] <= 0) continue;
    gid.push_back(ids[i]);
    off.push_back(static_cast<int>(rows));
    cnt.push_back(static_cast<int>(n[i]));
    rows += n[i];
  }
  if (rows == 0) return {};
  SY_CU(cudaSetDevice(eng.device));
  const size_t fbytes = static_cast<size_t>(rows * h) * 4;
  SY_TRY(s.host.reserve(fbytes));
  SY_TRY(s.x32.reserve(fbytes));
  SY_TRY(s.y32.reserve(fbytes));
  SY_TRY(s.xs.reserve(fbytes / 2));
  SY_TRY(s.yo.reserve(fbytes / 2));
  SY_CU(cudaStreamSynchronize(eng.stream));
  for (size_t i = 0, g = 0; i < ids.size(); ++i)
    if (n[i] > 0) std::memcpy(s.host.as<float>() + int64_t(off[g++]) * h, inputs[i], static_cast<size_t>(n[i] * h) * 4);
  SY_CU(cudaMemcpyAsync(s.x32.p, s.host.p, fbytes, cudaMemcpyHostToDevice, eng.stream));
  f32_to_bf16_kernel<<<blocks_for(rows * h), 256, 0, eng.stream>>>(s.x32.as<float>(), s.xs.as<bf16>(), rows * h);
  SY_CU(cudaGetLastError());
  SY_TRY(eng.compute(gid, off, cnt, s.xs.as<bf16>(), rows, s.yo.as<bf16>()));
  bf16_to_f32_kernel<<<blocks_for(rows * h), 256, 0, eng.stream>>>(s.yo.as<bf16>(), s.y32.as<float>(), rows * h);
  SY_CU(cudaGetLastError());
  SY_CU(cudaMemcpyAsync(s.host.p, s.y32.p, fbytes, cudaMemcpyDeviceToHost, eng.stream));
  SY_CU(cudaStreamSynchronize(eng.stream));
  for (size_t i = 0, g = 0; i < ids.size(); ++i)
    if (n[i] > 0) std::memcpy(outputs[i], s.host.as<float>() + int64_t(off[g++]) * h, static_cast<size_t>(n[i] * h) * 4);
  return {};
}

// ---- gpu_moe_layer ----

struct gpu_moe_layer::impl {
  expert_engine engine;
  gating_config gating;
  dbuf router, bias, slot, logits, idx, w, counts, offsets, fill, pos, xs, yo, x_in, y_out;
  std::vector<int> slot_host;
  hbuf counts_host, offsets_host;
  int64_t last_t = 0;
  int last_active = 0;
  size_t last_bytes = 0;
  std::vector<std::unique_ptr<dbuf>> scratch;
};

gpu_moe_layer::gpu_moe_layer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
gpu_moe_layer::~gpu_moe_layer() = default;

caf::expected<std::unique_ptr<gpu_moe_layer>> gpu_moe_layer::make(int device, const gating_config& gating,
                                                                  const matrix& router, const float* score_bias,
                                                                  std::span<const expert_weights* const> experts) {
  if (gating.num_experts > max_experts || gating.n_group > max_groups)
    return make_error(model_errc::unsupported, "gpu layer: at most " + std::to_string(max_experts) + " experts and " +
                                                   std::to_string(max_groups) + " groups");
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
    }
  auto r = router.to_f32();
  if (auto err = p->router.reserve(r.size() * 4)) return err;
  if (auto err = p->slot.reserve(p->slot_host.size() * 4)) return err;
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
  if (auto err = p->counts_host.reserve(static_cast<size_t>(gating.num_experts) * 4)) return err;
  if (auto err = p->offsets_host.reserve(static_cast<size_t>(gating.num_experts) * 4)) return err;
  return std::unique_ptr<gpu_moe_layer>(new gpu_moe_layer(std::move(p)));
}

caf::error gpu_moe_layer::forward_device(const float* x, int64_t t, float* y) {
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
  // Router logits in true fp32 (the default math mode, no TF32), so expert choices match the CPU.
  const float one = 1.0f, zero = 0.0f;
  SY_CUBLAS(cublasSgemm(eng.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(e), static_cast<int>(t), static_cast<int>(h),
                        &one, s.router.as<float>(), static_cast<int>(h), x, static_cast<int>(h), &zero,
                        s.logits.as<float>(), static_cast<int>(e)));
  gate_params gp{static_cast<int>(e), static_cast<int>(k), g.n_group, g.topk_group,
                 g.scoring == scoring_func::sigmoid, static_cast<int>(g.method), g.norm_topk_prob,
                 g.scale_only_unnormalised, static_cast<float>(g.norm_eps), static_cast<float>(g.routed_scaling_factor)};
  gate_kernel<<<blocks_for(t, 128), 128, 0, eng.stream>>>(s.logits.as<float>(), s.bias.p ? s.bias.as<float>() : nullptr,
                                                          gp, t, s.idx.as<int>(), s.w.as<float>());
  SY_CU(cudaGetLastError());
  SY_CU(cudaMemsetAsync(s.counts.p, 0, static_cast<size_t>(e) * 4, eng.stream));
  count_kernel<<<blocks_for(n), 256, 0, eng.stream>>>(s.idx.as<int>(), n, s.slot.as<int>(), s.counts.as<int>());
  SY_CU(cudaGetLastError());
  // The grouped GEMM takes its sizes on the host: one small copy per layer.
  SY_CU(cudaMemcpyAsync(s.counts_host.p, s.counts.p, static_cast<size_t>(e) * 4, cudaMemcpyDeviceToHost, eng.stream));
  SY_CU(cudaStreamSynchronize(eng.stream));
  const int* counts = s.counts_host.as<int>();
  int* offsets = s.offsets_host.as<int>();  // pinned: its copy runs after this function returns
  std::vector<int> ids, off, cnt;
  int rows = 0;
  size_t bytes = 0;
  for (int i = 0; i < e; ++i) {
    offsets[i] = rows;
    if (counts[i] > 0) {
      ids.push_back(i);
      off.push_back(rows);
      cnt.push_back(counts[i]);
      rows += counts[i];
      bytes += static_cast<size_t>(3 * h * eng.ffn) * 2;
    }
  }
  s.last_t = t;
  s.last_active = static_cast<int>(ids.size());
  s.last_bytes = bytes;
  SY_CU(cudaMemcpyAsync(s.offsets.p, offsets, static_cast<size_t>(e) * 4, cudaMemcpyHostToDevice, eng.stream));
  SY_CU(cudaMemsetAsync(s.fill.p, 0, static_cast<size_t>(e) * 4, eng.stream));
  scatter_kernel<<<blocks_for(n), 256, 0, eng.stream>>>(s.idx.as<int>(), n, s.slot.as<int>(), s.offsets.as<int>(),
                                                        s.fill.as<int>(), s.pos.as<int>());
  SY_CU(cudaGetLastError());
  if (n > 0) {
    gather_kernel<<<static_cast<unsigned>(n), 256, 0, eng.stream>>>(x, h, s.pos.as<int>(), static_cast<int>(k), s.xs.as<bf16>());
    SY_CU(cudaGetLastError());
  }
  SY_TRY(eng.compute(ids, off, cnt, s.xs.as<bf16>(), rows, s.yo.as<bf16>()));
  if (t > 0) {
    combine_kernel<<<static_cast<unsigned>(t), 256, 0, eng.stream>>>(s.yo.as<bf16>(), s.pos.as<int>(), s.w.as<float>(),
                                                                    static_cast<int>(k), h, y);
    SY_CU(cudaGetLastError());
  }
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

int gpu_moe_layer::last_active_experts() const { return impl_->last_active; }
size_t gpu_moe_layer::last_weight_bytes() const { return impl_->last_bytes; }

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
