#pragma once
/// Rotary position embeddings: default, linear and YaRN frequency tables, applied in the half-split
/// (rotate_half) layout or DeepSeek's interleaved layout.
#include "model/config.hpp"

#include <cstdint>
#include <vector>

namespace sy::model {

class rope_table {
 public:
  rope_table() = default;
  /// Frequencies for a rotary dimension `dim` (even) under `cfg`.
  rope_table(const rope_config& cfg, int64_t dim);

  /// Rotates `heads` consecutive vectors of `dim` values at `x` (stride `stride` between heads) for
  /// position `pos`. With `interleave`, pairs (2i, 2i+1) are first de-interleaved to the half-split
  /// layout, as the reference does; the result stays in that layout.
  void apply(float* x, int heads, int64_t stride, int64_t pos) const;

  [[nodiscard]] const std::vector<double>& inv_freq() const { return inv_freq_; }
  [[nodiscard]] double attention_factor() const { return attention_factor_; }

 private:
  int64_t dim_ = 0;
  bool interleave_ = false;
  double attention_factor_ = 1.0;
  std::vector<double> inv_freq_;
};

}  // namespace sy::model
