#pragma once
/// CPU kernels. All activations are f32; weights are `matrix` (f32 or bf16). Pure functions of their
/// inputs: nothing here keeps state between calls.
#include "model/tensor.hpp"

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace sy::model {

/// y[T, N] = x[T, K] · Wᵀ (+ bias[N]), W being [N, K]. `y` must not alias `x`.
/// Small T streams the weights once through a register-blocked kernel (memory bound); larger T uses
/// OpenBLAS sgemm (bf16 weights are widened panel by panel so the panel stays in cache).
void linear(const float* x, int64_t t, const matrix& w, const float* bias, float* y);

/// One GEMM of a grouped call: y[t, w.rows()] = x[t, w.cols()] · wᵀ.
struct linear_job {
  const float* x = nullptr;
  int64_t t = 0;
  const matrix* w = nullptr;
  float* y = nullptr;
};

/// Runs many independent GEMMs (e.g. every expert of a step) as one grouped call: packed jobs are
/// cut into 64-column pieces that the threads share out together, the CPU analogue of a grouped
/// GEMM launch. Same results as calling `linear` on each.
void linear_grouped(std::span<const linear_job> jobs);

/// Token count at or below which `linear` uses the streaming kernel.
int64_t linear_stream_threshold();

/// y = x / sqrt(mean(x²) + eps) · w over rows of length `dim`; y may alias x.
void rmsnorm(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* y);

/// In-place softmax over `n` values.
void softmax(float* x, int64_t n);

/// out[i] = silu(gate[i]) · up[i] for rows of a [rows, 2·f] buffer laid out as [gate | up]; out is
/// [rows, f].
void swiglu(const float* gate_up, int64_t rows, int64_t f, float* out);

[[nodiscard]] inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
[[nodiscard]] inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

/// Sets the number of threads the kernels (and OpenBLAS) use; 0 = all cores.
void set_kernel_threads(int n);

}  // namespace sy::model
