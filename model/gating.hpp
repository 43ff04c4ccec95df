#pragma once
/// Top-k gating: router logits → scores → the chosen experts and their combine weights, for every
/// family's rule (softmax or sigmoid scores; greedy, group-limited or bias-for-choice top-k;
/// optional renormalisation and scaling).
#include "model/config.hpp"
#include "model/tensor.hpp"

#include <cstdint>
#include <vector>

namespace sy::model {

/// The gate's decision for T tokens: row t's experts are experts[t·k .. t·k+k) with the matching
/// weights. Experts of a row are listed in the order top-k ranked them.
struct routing {
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<int32_t> experts;
  std::vector<float> weights;
};

/// Turns router logits [T, E] into a routing. `score_bias` ([E], or null) is added to the scores
/// for choosing experts only; weights always come from the unbiased scores.
[[nodiscard]] routing route_from_logits(const gating_config& cfg, const float* logits, int64_t tokens,
                                        const float* score_bias = nullptr);

/// The gate: logits = x · routerᵀ (f32), then `route_from_logits`.
[[nodiscard]] routing gate(const gating_config& cfg, const matrix& router, const float* score_bias, const float* x,
                           int64_t tokens);

}  // namespace sy::model
