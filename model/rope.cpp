#include "model/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace sy::model {

rope_table::rope_table(const rope_config& cfg, int64_t dim)
    : dim_(dim), interleave_(cfg.interleave), attention_factor_(cfg.attention_factor()) {
  const int64_t half = dim / 2;
  inv_freq_.resize(static_cast<size_t>(half));
  // The reference computes these in float32; doing the same keeps positions far out identical.
  for (int64_t i = 0; i < half; ++i) {
    float pos_freq = std::pow(static_cast<float>(cfg.theta), static_cast<float>(2 * i) / static_cast<float>(dim));
    inv_freq_[static_cast<size_t>(i)] = 1.0f / pos_freq;
  }
  if (cfg.type == "linear") {
    for (auto& f : inv_freq_) f = static_cast<float>(f / cfg.factor);
  } else if (cfg.type == "yarn") {
    const double base = cfg.theta;
    const double omax = static_cast<double>(cfg.original_max_position);
    auto correction_dim = [&](double rotations) {
      return (static_cast<double>(dim) * std::log(omax / (rotations * 2 * std::numbers::pi))) / (2 * std::log(base));
    };
    double low = std::max(0.0, std::floor(correction_dim(cfg.beta_fast)));
    double high = std::min(static_cast<double>(dim - 1), std::ceil(correction_dim(cfg.beta_slow)));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      float ramp = static_cast<float>((static_cast<double>(i) - low) / (high - low));
      ramp = std::clamp(ramp, 0.0f, 1.0f);
      const float extrap_factor = 1.0f - ramp;
      const float extrap = static_cast<float>(inv_freq_[static_cast<size_t>(i)]);
      const float interp = static_cast<float>(extrap / cfg.factor);
      inv_freq_[static_cast<size_t>(i)] = interp * (1 - extrap_factor) + extrap * extrap_factor;
    }
  }
}

void rope_table::apply(float* x, int heads, int64_t stride, int64_t pos) const {
  const int64_t half = dim_ / 2;
  thread_local std::vector<float> cs, sn, tmp;
  cs.resize(static_cast<size_t>(half));
  sn.resize(static_cast<size_t>(half));
  tmp.resize(static_cast<size_t>(dim_));
  for (int64_t i = 0; i < half; ++i) {
    // float32 angle, as the reference's `inv_freq @ position_ids`
    const float angle = static_cast<float>(inv_freq_[static_cast<size_t>(i)]) * static_cast<float>(pos);
    cs[static_cast<size_t>(i)] = static_cast<float>(std::cos(angle) * attention_factor_);
    sn[static_cast<size_t>(i)] = static_cast<float>(std::sin(angle) * attention_factor_);
  }
  for (int h = 0; h < heads; ++h) {
    float* v = x + h * stride;
    if (interleave_) {
      for (int64_t i = 0; i < half; ++i) {
        tmp[static_cast<size_t>(i)] = v[2 * i];
        tmp[static_cast<size_t>(half + i)] = v[2 * i + 1];
      }
      std::copy_n(tmp.begin(), dim_, v);
    }
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cs[static_cast<size_t>(i)] - b * sn[static_cast<size_t>(i)];
      v[i + half] = b * cs[static_cast<size_t>(i)] + a * sn[static_cast<size_t>(i)];
    }
  }
}

}  // namespace sy::model
