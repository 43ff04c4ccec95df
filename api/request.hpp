#pragma once
/// Decoding and validating the JSON bodies of the OpenAI-style routes, apart from any HTTP: a body
/// in, a typed request or the first problem (naming its field) out. Fuzzed on its own.
#include "model/sampler.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace sy::model {
class tokenizer;
}

namespace sy::api {

/// What parsing needs to know about the server.
struct request_limits {
  std::string model_name;
  int64_t vocab_size = 0;
  int64_t max_context = 0;           ///< prompt + max_tokens must fit (0 = no limit)
  int64_t max_prompt_tokens = 0;     ///< per prompt (0 = only the context)
  int max_tokens = 1 << 20;          ///< largest max_tokens accepted
  int max_choices = 64;              ///< prompts × n
  const model::tokenizer* tokenizer = nullptr;  ///< null: prompts must be token ids
};

struct bad_request {
  std::string param, message;
  int64_t n_prompt_tokens = -1;  ///< set when the context limit is what was exceeded
};

struct completion_request {
  std::vector<std::vector<int32_t>> prompts;
  int max_tokens = 16;
  model::sampling_params sampling;
  int n = 1;
  bool echo = false;
  int logprobs = -1;                        ///< -1 = none; else the alternatives per token (0..20)
  std::vector<std::string> stop;            ///< stop strings (need a tokenizer)
  std::vector<int32_t> stop_token_ids;
  bool stream = false;
  bool include_usage = true;                ///< usage in the last streamed chunk
  bool skip_special_tokens = true;
  bool ignore_eos = false;                  ///< vLLM's extension: generate max_tokens regardless
};

/// POST /v1/completions. `prompt`: text, a list of token ids, or a list of either.
[[nodiscard]] std::variant<completion_request, bad_request> parse_completion(const std::string& body,
                                                                             const request_limits& limits);

struct tokenize_request {
  std::string text;
  bool add_special_tokens = true;
};
struct detokenize_request {
  std::vector<int32_t> tokens;
};
[[nodiscard]] std::variant<tokenize_request, bad_request> parse_tokenize(const std::string& body, const request_limits& limits);
[[nodiscard]] std::variant<detokenize_request, bad_request> parse_detokenize(const std::string& body,
                                                                             const request_limits& limits);

}  // namespace sy::api
