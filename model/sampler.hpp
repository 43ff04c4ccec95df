#pragma once
/// Token sampling: greedy when temperature is 0, else temperature → top-k → top-p → a draw from a
/// per-sequence generator seeded by the caller, so the same seed gives the same tokens.
#include "model/error.hpp"

#include <cstdint>
#include <random>
#include <span>

namespace sy::model {

struct sampling_params {
  double temperature = 0.0;  ///< 0 = greedy
  int top_k = 0;             ///< 0 = no limit
  double top_p = 1.0;        ///< 1 = no limit
  uint64_t seed = 0;
};

/// Checks ranges; the error names the parameter.
[[nodiscard]] caf::error validate(const sampling_params& p);

class sampler {
 public:
  explicit sampler(const sampling_params& p) : p_(p), rng_(p.seed) {}
  /// Picks a token from `logits`. Greedy ties go to the lowest id.
  [[nodiscard]] int32_t sample(std::span<const float> logits);

 private:
  sampling_params p_;
  std::mt19937_64 rng_;
};

[[nodiscard]] int32_t argmax(std::span<const float> logits);

}  // namespace sy::model
