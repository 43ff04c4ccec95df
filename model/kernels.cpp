#include "model/kernels.hpp"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace sy::model {

namespace {

bool have_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// ---- streaming kernel: every weight row is read once and dotted with all T token rows ----

template <bool Bf16>
__attribute__((target("avx2,fma"))) inline __m256 load8(const void* w, int64_t k) {
  if constexpr (Bf16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

template <bool Bf16>
inline float scalar_w(const void* w, int64_t k) {
  if constexpr (Bf16) return bf16_to_f32(static_cast<const uint16_t*>(w)[k]);
  else return static_cast<const float*>(w)[k];
}

/// Two weight rows × TB tokens per pass: 2·TB accumulators stay in registers.
template <bool Bf16, int TB>
__attribute__((target("avx2,fma"))) void stream_rows_avx2(const float* x, int64_t ldx, const std::byte* wbase,
                                                         int64_t k, int64_t n0, int64_t n1, float* y, int64_t ldy,
                                                         const float* bias) {
  const size_t row_bytes = static_cast<size_t>(k) * (Bf16 ? 2 : 4);
  const int64_t k8 = k & ~int64_t{7};
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const void* w0 = wbase + static_cast<size_t>(n) * row_bytes;
    const void* w1 = wbase + static_cast<size_t>(n + 1) * row_bytes;
    __m256 acc0[TB], acc1[TB];
    for (int t = 0; t < TB; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k8; i += 8) {
      __m256 a = load8<Bf16>(w0, i), b = load8<Bf16>(w1, i);
      for (int t = 0; t < TB; ++t) {
        __m256 xv = _mm256_loadu_ps(x + t * ldx + i);
        acc0[t] = _mm256_fmadd_ps(a, xv, acc0[t]);
        acc1[t] = _mm256_fmadd_ps(b, xv, acc1[t]);
      }
    }
    for (int t = 0; t < TB; ++t) {
      float s0 = hsum(acc0[t]), s1 = hsum(acc1[t]);
      for (int64_t i = k8; i < k; ++i) {
        s0 += scalar_w<Bf16>(w0, i) * x[t * ldx + i];
        s1 += scalar_w<Bf16>(w1, i) * x[t * ldx + i];
      }
      y[t * ldy + n] = s0 + (bias ? bias[n] : 0.f);
      y[t * ldy + n + 1] = s1 + (bias ? bias[n + 1] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    const void* w0 = wbase + static_cast<size_t>(n) * row_bytes;
    for (int t = 0; t < TB; ++t) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < k8; i += 8) acc = _mm256_fmadd_ps(load8<Bf16>(w0, i), _mm256_loadu_ps(x + t * ldx + i), acc);
      float s = hsum(acc);
      for (int64_t i = k8; i < k; ++i) s += scalar_w<Bf16>(w0, i) * x[t * ldx + i];
      y[t * ldy + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

template <bool Bf16>
void stream_rows_generic(const float* x, int64_t ldx, int tb, const std::byte* wbase, int64_t k, int64_t n0,
                         int64_t n1, float* y, int64_t ldy, const float* bias) {
  const size_t row_bytes = static_cast<size_t>(k) * (Bf16 ? 2 : 4);
  for (int64_t n = n0; n < n1; ++n) {
    const void* w = wbase + static_cast<size_t>(n) * row_bytes;
    for (int t = 0; t < tb; ++t) {
      float s = 0;
      for (int64_t i = 0; i < k; ++i) s += scalar_w<Bf16>(w, i) * x[t * ldx + i];
      y[t * ldy + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

template <bool Bf16>
void stream_block(const float* x, int64_t ldx, int tb, const matrix& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                  const float* bias) {
  const std::byte* base = w.raw();
  const int64_t k = w.cols();
  if (!have_avx2_fma()) return stream_rows_generic<Bf16>(x, ldx, tb, base, k, n0, n1, y, ldy, bias);
  switch (tb) {
    case 1: return stream_rows_avx2<Bf16, 1>(x, ldx, base, k, n0, n1, y, ldy, bias);
    case 2: return stream_rows_avx2<Bf16, 2>(x, ldx, base, k, n0, n1, y, ldy, bias);
    case 3: return stream_rows_avx2<Bf16, 3>(x, ldx, base, k, n0, n1, y, ldy, bias);
    case 4: return stream_rows_avx2<Bf16, 4>(x, ldx, base, k, n0, n1, y, ldy, bias);
    case 5: return stream_rows_avx2<Bf16, 5>(x, ldx, base, k, n0, n1, y, ldy, bias);
    case 6: return stream_rows_avx2<Bf16, 6>(x, ldx, base, k, n0, n1, y, ldy, bias);
    case 7: return stream_rows_avx2<Bf16, 7>(x, ldx, base, k, n0, n1, y, ldy, bias);
    default: return stream_rows_avx2<Bf16, 8>(x, ldx, base, k, n0, n1, y, ldy, bias);
  }
}

void linear_stream(const float* x, int64_t t, const matrix& w, const float* bias, float* y) {
  const int64_t n = w.rows(), k = w.cols();
  // Row groups small enough that their weights stay in L2 while every token block passes over
  // them, so the weights come from memory once whatever t is.
  const int64_t group = std::max<int64_t>(2, std::min<int64_t>(64, (int64_t{256} << 10) / std::max<int64_t>(1, k * static_cast<int64_t>(dtype_size(w.type())))) & ~int64_t{1});
  const int64_t tasks = (n + group - 1) / group;
  const bool parallel = n * k * t >= (1 << 16);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < tasks; ++c) {
    const int64_t n0 = c * group, n1 = std::min(n, n0 + group);
    for (int64_t t0 = 0; t0 < t; t0 += 8) {
      const int tb = static_cast<int>(std::min<int64_t>(8, t - t0));
      if (w.type() == dtype::bf16)
        stream_block<true>(x + t0 * k, k, tb, w, n0, n1, y + t0 * n, n, bias);
      else
        stream_block<false>(x + t0 * k, k, tb, w, n0, n1, y + t0 * n, n, bias);
    }
  }
}

__attribute__((target("avx2,fma"))) void widen_bf16_avx2(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load8<true>(s, i));
  for (; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

void widen_bf16(const uint16_t* s, float* d, int64_t n) {
  if (have_avx2_fma()) return widen_bf16_avx2(s, d, n);
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

/// Panels of output rows split over the OpenMP threads; each thread runs sgemm on its panel (OpenBLAS
/// runs single-threaded inside a parallel region; bf16 weights are widened into a thread-local,
/// cache-sized buffer first).
void linear_gemm(const float* x, int64_t t, const matrix& w, const float* bias, float* y) {
  const int64_t n = w.rows(), k = w.cols();
  const int threads = omp_get_max_threads();
  // ~1 MiB of f32 weights per panel, a multiple of 16 rows, and enough panels for every thread.
  int64_t panel = std::max<int64_t>(16, ((int64_t{1} << 18) / std::max<int64_t>(k, 1)) & ~int64_t{15});
  panel = std::min(panel, std::max<int64_t>(16, ((n + threads - 1) / threads + 15) & ~int64_t{15}));
  const int64_t tasks = (n + panel - 1) / panel;
#pragma omp parallel for schedule(dynamic) if (tasks > 1 && t * n * k >= (1 << 20))
  for (int64_t p = 0; p < tasks; ++p) {
    const int64_t n0 = p * panel, rows = std::min(panel, n - n0);
    const float* wp;
    thread_local std::vector<float> buf;
    if (w.type() == dtype::f32) {
      wp = w.f32() + n0 * k;
    } else {
      buf.resize(static_cast<size_t>(rows * k));
      widen_bf16(w.bf16() + n0 * k, buf.data(), rows * k);
      wp = buf.data();
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(rows),
                static_cast<int>(k), 1.0f, x, static_cast<int>(k), wp, static_cast<int>(k), 0.0f, y + n0,
                static_cast<int>(n));
  }
  if (bias)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

// ---- packed bf16 GEMM: tiles of MR tokens × 16 outputs, 2·MR accumulators in registers ----

template <int MR>
__attribute__((target("avx2,fma"))) void packed_tile(const float* x, int64_t ldx, const uint16_t* w, int64_t kc,
                                                   float* y, int64_t ldy, bool accumulate, int64_t ncols) {
  // Named accumulators: GCC keeps an array of __m256 on the stack and stores it every iteration.
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const float* x0 = x;
  const float* x1 = x + ldx;
  const float* x2 = x + 2 * ldx;
  const float* x3 = x + 3 * ldx;
  const float* x4 = x + 4 * ldx;
  const float* x5 = x + 5 * ldx;
  for (int64_t k = 0; k < kc; ++k) {
    // The block's next k-chunk follows this one in memory: fetch it while this tile computes.
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + 256) * 16), _MM_HINT_T0);
    const __m256 w0 = load8<true>(w, k * 16), w1 = load8<true>(w, k * 16 + 8);
    __m256 b = _mm256_broadcast_ss(x0 + k);
    a00 = _mm256_fmadd_ps(w0, b, a00);
    a01 = _mm256_fmadd_ps(w1, b, a01);
    if constexpr (MR > 1) {
      b = _mm256_broadcast_ss(x1 + k);
      a10 = _mm256_fmadd_ps(w0, b, a10);
      a11 = _mm256_fmadd_ps(w1, b, a11);
    }
    if constexpr (MR > 2) {
      b = _mm256_broadcast_ss(x2 + k);
      a20 = _mm256_fmadd_ps(w0, b, a20);
      a21 = _mm256_fmadd_ps(w1, b, a21);
    }
    if constexpr (MR > 3) {
      b = _mm256_broadcast_ss(x3 + k);
      a30 = _mm256_fmadd_ps(w0, b, a30);
      a31 = _mm256_fmadd_ps(w1, b, a31);
    }
    if constexpr (MR > 4) {
      b = _mm256_broadcast_ss(x4 + k);
      a40 = _mm256_fmadd_ps(w0, b, a40);
      a41 = _mm256_fmadd_ps(w1, b, a41);
    }
    if constexpr (MR > 5) {
      b = _mm256_broadcast_ss(x5 + k);
      a50 = _mm256_fmadd_ps(w0, b, a50);
      a51 = _mm256_fmadd_ps(w1, b, a51);
    }
  }
  alignas(32) float out[6][16];
  _mm256_store_ps(out[0], a00);
  _mm256_store_ps(out[0] + 8, a01);
  _mm256_store_ps(out[1], a10);
  _mm256_store_ps(out[1] + 8, a11);
  _mm256_store_ps(out[2], a20);
  _mm256_store_ps(out[2] + 8, a21);
  _mm256_store_ps(out[3], a30);
  _mm256_store_ps(out[3] + 8, a31);
  _mm256_store_ps(out[4], a40);
  _mm256_store_ps(out[4] + 8, a41);
  _mm256_store_ps(out[5], a50);
  _mm256_store_ps(out[5] + 8, a51);
  for (int t = 0; t < MR; ++t) {
    float* yr = y + t * ldy;
    if (accumulate)
      for (int64_t j = 0; j < ncols; ++j) yr[j] += out[t][j];
    else
      for (int64_t j = 0; j < ncols; ++j) yr[j] = out[t][j];
  }
}

void packed_tile_generic(const float* x, int64_t ldx, int mr, const uint16_t* w, int64_t kc, float* y, int64_t ldy,
                         bool accumulate, int64_t ncols) {
  for (int t = 0; t < mr; ++t)
    for (int64_t j = 0; j < ncols; ++j) {
      float s = accumulate ? y[t * ldy + j] : 0.0f;
      for (int64_t k = 0; k < kc; ++k) s += bf16_to_f32(w[k * 16 + j]) * x[t * ldx + k];
      y[t * ldy + j] = s;
    }
}

void packed_tile_any(const float* x, int64_t ldx, int mr, const uint16_t* w, int64_t kc, float* y, int64_t ldy,
                     bool accumulate, int64_t ncols) {
  if (!have_avx2_fma()) return packed_tile_generic(x, ldx, mr, w, kc, y, ldy, accumulate, ncols);
  switch (mr) {
    case 1: return packed_tile<1>(x, ldx, w, kc, y, ldy, accumulate, ncols);
    case 2: return packed_tile<2>(x, ldx, w, kc, y, ldy, accumulate, ncols);
    case 3: return packed_tile<3>(x, ldx, w, kc, y, ldy, accumulate, ncols);
    case 4: return packed_tile<4>(x, ldx, w, kc, y, ldy, accumulate, ncols);
    case 5: return packed_tile<5>(x, ldx, w, kc, y, ldy, accumulate, ncols);
    default: return packed_tile<6>(x, ldx, w, kc, y, ldy, accumulate, ncols);
  }
}

/// y = x · Wᵀ for a packed bf16 W. Threads split the output columns in groups of 4 blocks (64
/// outputs); inside a group the loop runs over k-chunks, then 6-token tiles, then the blocks, so a
/// tile's inputs stay in L1 while four weight blocks stream past them, and every weight is read
/// from memory once whatever the token count.
constexpr int64_t packed_group = 4;  // blocks of 16 outputs per unit of parallel work

int64_t packed_groups(const matrix& w) {
  const int64_t blocks = (w.rows() + matrix::pack_width - 1) / matrix::pack_width;
  return (blocks + packed_group - 1) / packed_group;
}

/// Output columns of group g (64 of them): the loop runs over k-chunks, then token tiles, then the
/// group's blocks, so a tile's inputs stay in L1 while four weight blocks stream past them.
void linear_packed_group(const float* x, int64_t t, const matrix& w, float* y, int64_t g) {
  constexpr int64_t nb = matrix::pack_width, kc_max = 256, mr = 6;
  const int64_t n = w.rows(), k = w.cols();
  const int64_t blocks = (n + nb - 1) / nb;
  const uint16_t* wp = w.bf16();
  const int64_t b0 = g * packed_group, b1 = std::min(blocks, b0 + packed_group);
  // Tiles as even as possible (32 tokens: 6,6,5,5,5,5 rather than 6,6,6,6,6,2).
  const int64_t tiles = (t + mr - 1) / mr, base = t / tiles, extra = t % tiles;
  for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, k - k0);
    for (int64_t i = 0, t0 = 0; i < tiles; ++i) {
      const int rows = static_cast<int>(base + (i < extra ? 1 : 0));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t col = b * nb, ncols = std::min(nb, n - col);
        packed_tile_any(x + t0 * k + k0, k, rows, wp + (b * k + k0) * nb, kc, y + t0 * n + col, n, k0 > 0, ncols);
      }
      t0 += rows;
    }
  }
}

/// y = x · Wᵀ for a packed bf16 W; threads share out the column groups. Every weight is read from
/// memory once whatever the token count.
void linear_packed(const float* x, int64_t t, const matrix& w, const float* bias, float* y) {
  const int64_t n = w.rows(), k = w.cols(), groups = packed_groups(w);
  const bool parallel = t * n * k >= (1 << 16) && groups > 1;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < groups; ++g) linear_packed_group(x, t, w, y, g);
  if (bias)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

}  // namespace

int64_t linear_stream_threshold() { return 16; }

void linear(const float* x, int64_t t, const matrix& w, const float* bias, float* y) {
  if (t <= 0 || w.rows() == 0) return;
  if (w.packed()) return linear_packed(x, t, w, bias, y);
  if (t <= linear_stream_threshold()) return linear_stream(x, t, w, bias, y);
  linear_gemm(x, t, w, bias, y);
}

void linear_grouped(std::span<const linear_job> jobs) {
  // Packed jobs are cut into column groups and all pieces shared out in one parallel region: no
  // barrier per GEMM, and small GEMMs fill the threads together. Other jobs run one by one.
  std::vector<std::pair<size_t, int64_t>> pieces;
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (jobs[j].t <= 0) continue;
    if (!jobs[j].w->packed()) {
      linear(jobs[j].x, jobs[j].t, *jobs[j].w, nullptr, jobs[j].y);
      continue;
    }
    for (int64_t g = 0, n = packed_groups(*jobs[j].w); g < n; ++g) pieces.emplace_back(j, g);
  }
#pragma omp parallel for schedule(dynamic, 4) if (pieces.size() > 1)
  for (size_t p = 0; p < pieces.size(); ++p) {
    const auto& job = jobs[pieces[p].first];
    linear_packed_group(job.x, job.t, *job.w, job.y, pieces[p].second);
  }
}

void rmsnorm(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

namespace {

/// exp(x) for 8 floats: range reduction x = n·ln2 + r with |r| ≤ ln2/2, a degree-7 polynomial for
/// e^r (relative error about 1e-7 over the range), and n added to the exponent bits.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/// x[i] = exp(x[i] - m); returns the sum.
__attribute__((target("avx2,fma"))) double exp_shift_avx2(float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  double s = hsum(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

}  // namespace

void softmax(float* x, int64_t n) {
  float m = *std::max_element(x, x + n);
  double s = 0;
  if (have_avx2_fma()) {
    s = exp_shift_avx2(x, n, m);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      x[i] = std::exp(x[i] - m);
      s += x[i];
    }
  }
  const float inv = static_cast<float>(1.0 / s);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

namespace {

__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* g, const float* u, float* o, int64_t f) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= f; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < f; ++i) o[i] = silu(g[i]) * u[i];
}

}  // namespace

void swiglu(const float* gate_up, int64_t rows, int64_t f, float* out) {
  const bool fast = have_avx2_fma();
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * f;
    const float* u = g + f;
    float* o = out + r * f;
    if (fast) {
      swiglu_avx2(g, u, o, f);
    } else {
      for (int64_t i = 0; i < f; ++i) o[i] = silu(g[i]) * u[i];
    }
  }
}

void set_kernel_threads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  // OpenBLAS is its OpenMP build: it shares this pool, and runs single-threaded when called
  // inside one of our parallel regions, so the two never fight over the cores.
  omp_set_num_threads(n);
}

}  // namespace sy::model
