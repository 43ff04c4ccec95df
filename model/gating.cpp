#include "model/gating.hpp"

#include "model/kernels.hpp"

#include <algorithm>
#include <numeric>

namespace sy::model {

namespace {

/// Indices of the k largest values, largest first; ties go to the lower index.
void top_k_indices(const float* v, int n, int k, int32_t* out) {
  thread_local std::vector<int32_t> idx;
  idx.resize(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [v](int32_t a, int32_t b) {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  });
  std::copy_n(idx.begin(), k, out);
}

}  // namespace

routing route_from_logits(const gating_config& cfg, const float* logits, int64_t tokens, const float* score_bias) {
  const int e = cfg.num_experts, k = cfg.top_k;
  routing r;
  r.tokens = tokens;
  r.top_k = k;
  r.experts.resize(static_cast<size_t>(tokens * k));
  r.weights.resize(static_cast<size_t>(tokens * k));
  std::vector<float> scores(static_cast<size_t>(e)), choice(static_cast<size_t>(e));
  std::vector<float> group_score(static_cast<size_t>(cfg.n_group));
  std::vector<int32_t> groups(static_cast<size_t>(cfg.n_group));
  const int per_group = e / cfg.n_group;
  for (int64_t t = 0; t < tokens; ++t) {
    std::copy_n(logits + t * e, e, scores.begin());
    if (cfg.scoring == scoring_func::softmax) {
      softmax(scores.data(), e);
    } else {
      for (auto& s : scores) s = sigmoid(s);
    }
    for (int i = 0; i < e; ++i) choice[static_cast<size_t>(i)] = scores[static_cast<size_t>(i)] + (score_bias ? score_bias[i] : 0.f);

    if (cfg.method != topk_method::greedy && cfg.n_group > 1) {
      // Rank groups (V3: sum of each group's two best choice scores; V2: its best score), keep the
      // best topk_group groups, and zero the rest (as the reference does, with 0 rather than -inf).
      for (int g = 0; g < cfg.n_group; ++g) {
        const float* s = choice.data() + g * per_group;
        if (cfg.method == topk_method::noaux_tc) {
          float best = -INFINITY, second = -INFINITY;
          for (int i = 0; i < per_group; ++i) {
            if (s[i] > best) {
              second = best;
              best = s[i];
            } else if (s[i] > second) {
              second = s[i];
            }
          }
          group_score[static_cast<size_t>(g)] = per_group >= 2 ? best + second : best;
        } else {
          group_score[static_cast<size_t>(g)] = *std::max_element(s, s + per_group);
        }
      }
      top_k_indices(group_score.data(), cfg.n_group, cfg.topk_group, groups.data());
      std::vector<bool> keep(static_cast<size_t>(cfg.n_group), false);
      for (int i = 0; i < cfg.topk_group; ++i) keep[static_cast<size_t>(groups[static_cast<size_t>(i)])] = true;
      for (int i = 0; i < e; ++i)
        if (!keep[static_cast<size_t>(i / per_group)]) choice[static_cast<size_t>(i)] = 0.0f;
    }

    int32_t* ex = r.experts.data() + t * k;
    float* w = r.weights.data() + t * k;
    top_k_indices(choice.data(), e, k, ex);
    double sum = 0;
    for (int i = 0; i < k; ++i) {
      w[i] = scores[static_cast<size_t>(ex[i])];
      sum += w[i];
    }
    const bool normalise = cfg.norm_topk_prob && !(cfg.scale_only_unnormalised && k == 1);
    if (normalise) {
      const double denom = sum + cfg.norm_eps;
      for (int i = 0; i < k; ++i) w[i] = static_cast<float>(w[i] / denom);
    }
    if (cfg.routed_scaling_factor != 1.0 && !(normalise && cfg.scale_only_unnormalised))
      for (int i = 0; i < k; ++i) w[i] = static_cast<float>(w[i] * cfg.routed_scaling_factor);
  }
  return r;
}

routing gate(const gating_config& cfg, const matrix& router, const float* score_bias, const float* x, int64_t tokens) {
  std::vector<float> logits(static_cast<size_t>(tokens * cfg.num_experts));
  linear(x, tokens, router, nullptr, logits.data());
  return route_from_logits(cfg, logits.data(), tokens, score_bias);
}

}  // namespace sy::model
