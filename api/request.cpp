#include "api/request.hpp"

#include "model/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <cmath>

namespace sy::api {
namespace {

using json = nlohmann::json;

std::optional<bad_request> read_ids(const json& a, const request_limits& lim, std::vector<int32_t>& ids, const char* field) {
  if (!a.is_array() || a.empty()) return bad_request{field, std::string(field) + ": a prompt must be non-empty"};
  for (const auto& v : a) {
    if (!v.is_number_integer()) return bad_request{field, std::string(field) + ": token ids must be integers"};
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id >= lim.vocab_size)
      return bad_request{field, "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                    std::to_string(lim.vocab_size) + ")"};
    ids.push_back(static_cast<int32_t>(id));
  }
  return std::nullopt;
}

std::optional<bad_request> read_text(const json& s, const request_limits& lim, std::vector<int32_t>& ids) {
  if (!lim.tokenizer)
    return bad_request{"prompt", "this server has no tokenizer (no tokenizer.json beside the model): send token ids"};
  const auto& text = s.get_ref<const std::string&>();
  if (text.empty()) return bad_request{"prompt", "a prompt must be non-empty"};
  auto enc = lim.tokenizer->encode(text, true);
  if (!enc) return bad_request{"prompt", "the prompt cannot be tokenized: " + model::describe(enc.error())};
  if (enc->empty()) return bad_request{"prompt", "the prompt has no tokens"};
  ids = std::move(*enc);
  return std::nullopt;
}

std::optional<json> parse_object(const std::string& body, bad_request& err) {
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) {
    err = {"", "the body is not valid JSON"};
    return std::nullopt;
  }
  if (!j.is_object()) {
    err = {"", "the body must be a JSON object"};
    return std::nullopt;
  }
  return j;
}

bool present(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

/// `model`, when given, must name the served model.
std::optional<bad_request> check_model(const json& j, const request_limits& lim) {
  if (present(j, "model") && (!j["model"].is_string() || j["model"].get<std::string>() != lim.model_name))
    return bad_request{"model", "unknown model; this server serves '" + lim.model_name + "'"};
  return std::nullopt;
}

}  // namespace

std::variant<completion_request, bad_request> parse_completion(const std::string& body, const request_limits& lim) {
  bad_request err;
  auto parsed = parse_object(body, err);
  if (!parsed) return err;
  const json& j = *parsed;
  completion_request out;
  if (auto e = check_model(j, lim)) return *e;
  if (!present(j, "prompt")) return bad_request{"prompt", "prompt is required"};
  const auto& p = j["prompt"];
  if (p.is_string()) {
    out.prompts.emplace_back();
    if (auto e = read_text(p, lim, out.prompts.back())) return *e;
  } else if (p.is_array() && !p.empty() && (p[0].is_array() || p[0].is_string())) {
    for (const auto& one : p) {
      out.prompts.emplace_back();
      if (one.is_string()) {
        if (auto e = read_text(one, lim, out.prompts.back())) return *e;
      } else if (auto e = read_ids(one, lim, out.prompts.back(), "prompt")) {
        return *e;
      }
    }
  } else if (p.is_array()) {
    out.prompts.emplace_back();
    if (auto e = read_ids(p, lim, out.prompts.back(), "prompt")) return *e;
  } else {
    return bad_request{"prompt", "prompt must be a string, a list of token ids, or a list of either"};
  }
  if (present(j, "max_tokens")) {
    if (!j["max_tokens"].is_number_integer()) return bad_request{"max_tokens", "max_tokens must be an integer"};
    const int64_t m = j["max_tokens"].get<int64_t>();
    if (m < 0 || m > lim.max_tokens)
      return bad_request{"max_tokens", "max_tokens must be in [0, " + std::to_string(lim.max_tokens) + "]"};
    out.max_tokens = static_cast<int>(m);
  }
  auto number = [&](const char* key, double& dst, double lo, double hi) -> std::optional<bad_request> {
    if (!present(j, key)) return std::nullopt;
    if (!j[key].is_number()) return bad_request{key, std::string(key) + " must be a number"};
    const double v = j[key].get<double>();
    if (!std::isfinite(v) || v < lo || v > hi)
      return bad_request{key, std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"};
    dst = v;
    return std::nullopt;
  };
  if (auto e = number("temperature", out.sampling.temperature, 0.0, 100.0)) return *e;
  if (auto e = number("top_p", out.sampling.top_p, 1e-9, 1.0)) return *e;
  if (present(j, "top_k")) {
    if (!j["top_k"].is_number_integer() || j["top_k"].get<int64_t>() < -1 || j["top_k"].get<int64_t>() > (1 << 30))
      return bad_request{"top_k", "top_k must be an integer ≥ 0 (or -1 for no limit)"};
    out.sampling.top_k = static_cast<int>(std::max<int64_t>(0, j["top_k"].get<int64_t>()));
  }
  if (present(j, "seed")) {
    if (!j["seed"].is_number_integer()) return bad_request{"seed", "seed must be an integer"};
    out.sampling.seed = static_cast<uint64_t>(j["seed"].get<int64_t>());
  }
  if (present(j, "n")) {
    if (!j["n"].is_number_integer() || j["n"].get<int64_t>() < 1 || j["n"].get<int64_t>() > lim.max_choices)
      return bad_request{"n", "n must be an integer in [1, " + std::to_string(lim.max_choices) + "]"};
    out.n = static_cast<int>(j["n"].get<int64_t>());
  }
  if (static_cast<int64_t>(out.prompts.size()) * out.n > lim.max_choices)
    return bad_request{"n", "prompts × n must be at most " + std::to_string(lim.max_choices)};
  if (present(j, "echo")) {
    if (!j["echo"].is_boolean()) return bad_request{"echo", "echo must be a boolean"};
    out.echo = j["echo"].get<bool>();
  }
  if (present(j, "stream")) {
    if (!j["stream"].is_boolean()) return bad_request{"stream", "stream must be a boolean"};
    out.stream = j["stream"].get<bool>();
  }
  if (present(j, "stream_options")) {
    const auto& so = j["stream_options"];
    if (!so.is_object()) return bad_request{"stream_options", "stream_options must be an object"};
    if (present(so, "include_usage")) {
      if (!so["include_usage"].is_boolean()) return bad_request{"stream_options", "include_usage must be a boolean"};
      out.include_usage = so["include_usage"].get<bool>();
    }
  }
  if (present(j, "skip_special_tokens")) {
    if (!j["skip_special_tokens"].is_boolean()) return bad_request{"skip_special_tokens", "skip_special_tokens must be a boolean"};
    out.skip_special_tokens = j["skip_special_tokens"].get<bool>();
  }
  if (present(j, "ignore_eos")) {
    if (!j["ignore_eos"].is_boolean()) return bad_request{"ignore_eos", "ignore_eos must be a boolean"};
    out.ignore_eos = j["ignore_eos"].get<bool>();
  }
  if (present(j, "logprobs")) {
    if (!j["logprobs"].is_number_integer() || j["logprobs"].get<int64_t>() < 0 || j["logprobs"].get<int64_t>() > 20)
      return bad_request{"logprobs", "logprobs must be an integer in [0, 20]"};
    out.logprobs = static_cast<int>(j["logprobs"].get<int64_t>());
    if (out.echo) return bad_request{"echo", "echo together with logprobs is not supported (prompt log-probabilities)"};
  }
  if (present(j, "stop")) {
    const auto& s = j["stop"];
    auto add = [&](const json& v) -> std::optional<bad_request> {
      if (v.is_string()) {
        if (v.get_ref<const std::string&>().empty()) return bad_request{"stop", "stop strings must be non-empty"};
        if (!lim.tokenizer) return bad_request{"stop", "stop strings need a tokenizer; use stop_token_ids"};
        out.stop.push_back(v.get<std::string>());
      } else if (v.is_number_integer()) {
        const int64_t id = v.get<int64_t>();
        if (id < 0 || id >= lim.vocab_size) return bad_request{"stop", "stop token id " + std::to_string(id) + " is outside the vocabulary"};
        out.stop_token_ids.push_back(static_cast<int32_t>(id));
      } else {
        return bad_request{"stop", "stop must be a string, a token id, or a list of them"};
      }
      return std::nullopt;
    };
    if (s.is_array()) {
      if (s.size() > 16) return bad_request{"stop", "at most 16 stop sequences"};
      for (const auto& v : s)
        if (auto e = add(v)) return *e;
    } else if (auto e = add(s)) {
      return *e;
    }
  }
  if (present(j, "stop_token_ids")) {
    std::vector<int32_t> ids;
    if (!j["stop_token_ids"].is_array()) return bad_request{"stop_token_ids", "stop_token_ids must be a list of token ids"};
    for (const auto& v : j["stop_token_ids"]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= lim.vocab_size)
        return bad_request{"stop_token_ids", "stop_token_ids must be token ids in the vocabulary"};
      out.stop_token_ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
  }
  for (const auto& pr : out.prompts) {
    const auto n = static_cast<int64_t>(pr.size());
    if (lim.max_prompt_tokens > 0 && n > lim.max_prompt_tokens) {
      bad_request e{"prompt", "the prompt has " + std::to_string(n) + " tokens; at most " + std::to_string(lim.max_prompt_tokens) +
                                  " are accepted"};
      e.n_prompt_tokens = n;
      return e;
    }
    if (lim.max_context > 0 && n + out.max_tokens > lim.max_context) {
      bad_request e{"max_tokens", "prompt (" + std::to_string(n) + " tokens) + max_tokens (" + std::to_string(out.max_tokens) +
                                      ") exceeds the context limit of " + std::to_string(lim.max_context)};
      e.n_prompt_tokens = n;
      return e;
    }
  }
  return out;
}

std::variant<tokenize_request, bad_request> parse_tokenize(const std::string& body, const request_limits& lim) {
  bad_request err;
  auto parsed = parse_object(body, err);
  if (!parsed) return err;
  const json& j = *parsed;
  if (auto e = check_model(j, lim)) return *e;
  if (!lim.tokenizer) return bad_request{"prompt", "this server has no tokenizer (no tokenizer.json beside the model)"};
  if (!present(j, "prompt") || !j["prompt"].is_string()) return bad_request{"prompt", "prompt must be a string"};
  tokenize_request out;
  out.text = j["prompt"].get<std::string>();
  if (present(j, "add_special_tokens")) {
    if (!j["add_special_tokens"].is_boolean()) return bad_request{"add_special_tokens", "add_special_tokens must be a boolean"};
    out.add_special_tokens = j["add_special_tokens"].get<bool>();
  }
  return out;
}

std::variant<detokenize_request, bad_request> parse_detokenize(const std::string& body, const request_limits& lim) {
  bad_request err;
  auto parsed = parse_object(body, err);
  if (!parsed) return err;
  const json& j = *parsed;
  if (auto e = check_model(j, lim)) return *e;
  if (!lim.tokenizer) return bad_request{"tokens", "this server has no tokenizer (no tokenizer.json beside the model)"};
  if (!present(j, "tokens")) return bad_request{"tokens", "tokens is required"};
  detokenize_request out;
  if (!j["tokens"].is_array()) return bad_request{"tokens", "tokens must be a list of token ids"};
  for (const auto& v : j["tokens"]) {
    if (!v.is_number_integer()) return bad_request{"tokens", "token ids must be integers"};
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id >= lim.vocab_size) return bad_request{"tokens", "token id " + std::to_string(id) + " is outside the vocabulary"};
    out.tokens.push_back(static_cast<int32_t>(id));
  }
  return out;
}

}  // namespace sy::api
