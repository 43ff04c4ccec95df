#pragma once
/// Whole-prompt helpers on top of the decoder: full-sequence logits, and generation with a KV cache.
#include "model/decoder.hpp"
#include "model/sampler.hpp"

#include <vector>

namespace sy::model {

/// Logits for every position of each prompt, [T_i, vocab] per prompt.
[[nodiscard]] caf::expected<std::vector<std::vector<float>>> prompt_logits(decoder& d,
                                                                           const std::vector<std::vector<int32_t>>& prompts);

struct generation {
  std::vector<std::vector<int32_t>> ids;          ///< per prompt: the prompt, then the new tokens
  std::vector<std::vector<float>> step_logits;    ///< per prompt: [new tokens, vocab], the logits each token came from
  std::vector<bool> stopped_at_eos;
};

struct generate_options {
  int max_new_tokens = 16;
  sampling_params sampling;
  bool stop_at_eos = true;
  bool keep_logits = false;
};

/// Prefills all prompts together, then decodes them step by step as one batch; a sequence that
/// emits an EOS id of the model leaves the batch (when `stop_at_eos`). Sequence i samples with seed
/// `sampling.seed + i`.
[[nodiscard]] caf::expected<generation> generate(decoder& d, const std::vector<std::vector<int32_t>>& prompts,
                                                 const generate_options& opts);

}  // namespace sy::model
