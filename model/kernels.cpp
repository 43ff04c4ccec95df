#include "model/kernels.hpp"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

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
  // Rows per task: large enough to amortise scheduling, small enough to balance two cores.
  const int64_t chunk = std::max<int64_t>(16, n / (8 * std::max(1, omp_get_max_threads())));
  const int64_t tasks = (n + chunk - 1) / chunk;
  const bool parallel = n * k * t >= (1 << 16);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < tasks; ++c) {
    int64_t n0 = c * chunk, n1 = std::min(n, n0 + chunk);
    for (int64_t t0 = 0; t0 < t; t0 += 8) {
      int tb = static_cast<int>(std::min<int64_t>(8, t - t0));
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

void linear_gemm(const float* x, int64_t t, const matrix& w, const float* bias, float* y) {
  const int64_t n = w.rows(), k = w.cols();
  if (w.type() == dtype::f32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(n), static_cast<int>(k),
                1.0f, x, static_cast<int>(k), w.f32(), static_cast<int>(k), 0.0f, y, static_cast<int>(n));
  } else {
    // Widen a panel of rows to f32 (~2 MiB, cache resident) and multiply it; the widening is
    // amortised over the t tokens that reuse the panel.
    const int64_t panel = std::max<int64_t>(64, std::min<int64_t>(n, (int64_t{1} << 19) / std::max<int64_t>(k, 1)));
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(panel * k));
    for (int64_t n0 = 0; n0 < n; n0 += panel) {
      const int64_t rows = std::min(panel, n - n0);
      const uint16_t* src = w.bf16() + n0 * k;
      float* dst = buf.data();
#pragma omp parallel for schedule(static) if (rows * k >= (1 << 16))
      for (int64_t r = 0; r < rows; ++r) widen_bf16(src + r * k, dst + r * k, k);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(rows),
                  static_cast<int>(k), 1.0f, x, static_cast<int>(k), dst, static_cast<int>(k), 0.0f, y + n0,
                  static_cast<int>(n));
    }
  }
  if (bias)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

}  // namespace

int64_t linear_stream_threshold() { return 16; }

void linear(const float* x, int64_t t, const matrix& w, const float* bias, float* y) {
  if (t <= 0 || w.rows() == 0) return;
  if (t <= linear_stream_threshold()) return linear_stream(x, t, w, bias, y);
  linear_gemm(x, t, w, bias, y);
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

void softmax(float* x, int64_t n) {
  float m = *std::max_element(x, x + n);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  const float inv = static_cast<float>(1.0 / s);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void swiglu(const float* gate_up, int64_t rows, int64_t f, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * f;
    const float* u = g + f;
    float* o = out + r * f;
    for (int64_t i = 0; i < f; ++i) o[i] = silu(g[i]) * u[i];
  }
}

void set_kernel_threads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

}  // namespace sy::model
