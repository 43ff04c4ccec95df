#include "model/generate.hpp"

#include <algorithm>

namespace sy::model {

caf::expected<std::vector<std::vector<float>>> prompt_logits(decoder& d, const std::vector<std::vector<int32_t>>& prompts) {
  std::vector<kv_cache> caches(prompts.size());
  std::vector<std::vector<float>> logits(prompts.size());
  std::vector<sequence_step> steps;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) return make_error(model_errc::invalid_argument, "prompt " + std::to_string(i) + " is empty");
    steps.push_back({&caches[i], prompts[i], true, &logits[i]});
  }
  if (auto e = d.step(steps)) return e;
  return logits;
}

caf::expected<generation> generate(decoder& d, const std::vector<std::vector<int32_t>>& prompts,
                                   const generate_options& opts) {
  if (auto e = validate(opts.sampling)) return e;
  if (opts.max_new_tokens < 0) return make_error(model_errc::invalid_argument, "max_new_tokens must be >= 0");
  const auto& eos = d.config().eos_token_ids;
  const size_t b = prompts.size();
  generation g;
  g.ids = prompts;
  g.step_logits.resize(b);
  g.stopped_at_eos.assign(b, false);
  if (opts.max_new_tokens == 0) return g;
  std::vector<kv_cache> caches(b);
  std::vector<std::vector<float>> logits(b);
  std::vector<sampler> samplers;
  for (size_t i = 0; i < b; ++i) {
    if (prompts[i].empty()) return make_error(model_errc::invalid_argument, "prompt " + std::to_string(i) + " is empty");
    auto p = opts.sampling;
    p.seed += i;
    samplers.emplace_back(p);
  }
  std::vector<size_t> active(b);
  for (size_t i = 0; i < b; ++i) active[i] = i;
  std::vector<int32_t> next(b);
  for (int s = 0; s < opts.max_new_tokens && !active.empty(); ++s) {
    std::vector<sequence_step> steps;
    for (auto i : active) {
      std::span<const int32_t> toks = s == 0 ? std::span<const int32_t>(prompts[i]) : std::span<const int32_t>(&next[i], 1);
      steps.push_back({&caches[i], toks, false, &logits[i]});
    }
    if (auto e = d.step(steps)) return e;
    std::vector<size_t> still;
    for (auto i : active) {
      next[i] = samplers[i].sample(logits[i]);
      g.ids[i].push_back(next[i]);
      if (opts.keep_logits) g.step_logits[i].insert(g.step_logits[i].end(), logits[i].begin(), logits[i].end());
      if (opts.stop_at_eos && std::find(eos.begin(), eos.end(), next[i]) != eos.end())
        g.stopped_at_eos[i] = true;
      else
        still.push_back(i);
    }
    active.swap(still);
  }
  return g;
}

}  // namespace sy::model
