#pragma once
/// Synthetic expert loads for the planner's tests, benchmark and simulator: per layer a Zipf-like
/// popularity (expert rank r gets 1 / r^exponent) over a shuffled expert order, times a
/// multiplicative noise, scaled to a token count; and a drift that multiplies every load by a
/// random factor in [1 - d, 1 + d].
#include <cstdint>
#include <vector>

namespace sy::scheduler {

struct zipf_spec {
  int layers = 1;
  int experts = 8;
  double exponent = 1.0;     ///< 0 = uniform
  double noise = 0.1;        ///< each load × uniform[1 - noise, 1 + noise]
  double tokens = 1e6;       ///< total per layer (before noise)
  uint64_t seed = 1;
};

[[nodiscard]] std::vector<std::vector<double>> zipf_loads(const zipf_spec& s);
[[nodiscard]] std::vector<std::vector<double>> drift(const std::vector<std::vector<double>>& load, double d, uint64_t seed);

}  // namespace sy::scheduler
