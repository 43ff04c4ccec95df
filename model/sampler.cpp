#include "model/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace sy::model {

caf::error validate(const sampling_params& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0 || p.temperature > 100)
    return make_error(model_errc::invalid_argument, "temperature must be in [0, 100]");
  if (p.top_k < 0) return make_error(model_errc::invalid_argument, "top_k must be >= 0");
  if (!std::isfinite(p.top_p) || p.top_p <= 0 || p.top_p > 1)
    return make_error(model_errc::invalid_argument, "top_p must be in (0, 1]");
  return {};
}

int32_t argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t sampler::sample(std::span<const float> logits) {
  if (p_.temperature == 0.0) return argmax(logits);
  const size_t n = logits.size();
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  size_t keep = n;
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < n) keep = static_cast<size_t>(p_.top_k);
  // Sort the candidates by logit, descending, ties by id, so the result is reproducible.
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(keep), idx.end(), by_logit);
  idx.resize(keep);
  std::vector<double> prob(keep);
  const double m = logits[idx[0]];
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) {
    prob[i] = std::exp((logits[idx[i]] - m) / p_.temperature);
    sum += prob[i];
  }
  for (auto& p : prob) p /= sum;
  if (p_.top_p < 1.0) {
    double cum = 0;
    size_t cut = keep;
    for (size_t i = 0; i < keep; ++i) {
      cum += prob[i];
      if (cum >= p_.top_p) {
        cut = i + 1;
        break;
      }
    }
    prob.resize(cut);
    idx.resize(cut);
  }
  std::uniform_real_distribution<double> u(0.0, std::accumulate(prob.begin(), prob.end(), 0.0));
  double r = u(rng_), acc = 0;
  for (size_t i = 0; i < prob.size(); ++i) {
    acc += prob[i];
    if (r < acc) return idx[i];
  }
  return idx.back();
}

}  // namespace sy::model
