#include "scheduler/loadgen.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace sy::scheduler {

std::vector<std::vector<double>> zipf_loads(const zipf_spec& s) {
  std::mt19937_64 rng(s.seed);
  std::uniform_real_distribution<double> noise(1.0 - s.noise, 1.0 + s.noise);
  std::vector<std::vector<double>> out(static_cast<size_t>(s.layers));
  double norm = 0;
  for (int r = 1; r <= s.experts; ++r) norm += 1.0 / std::pow(r, s.exponent);
  for (auto& row : out) {
    std::vector<int> order(static_cast<size_t>(s.experts));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    row.assign(static_cast<size_t>(s.experts), 0.0);
    for (int r = 0; r < s.experts; ++r)
      row[static_cast<size_t>(order[static_cast<size_t>(r)])] = s.tokens / norm / std::pow(r + 1, s.exponent) * noise(rng);
  }
  return out;
}

std::vector<std::vector<double>> drift(const std::vector<std::vector<double>>& load, double d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> f(1.0 - d, 1.0 + d);
  auto out = load;
  for (auto& row : out)
    for (auto& x : row) x *= f(rng);
  return out;
}

}  // namespace sy::scheduler
