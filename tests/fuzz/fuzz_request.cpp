// Fuzz target: the JSON request decoder (api/request.hpp) on arbitrary bytes.
//
// Each input is a request body given to parse_completion, parse_tokenize and parse_detokenize,
// under two sets of limits: token ids only (no tokenizer, the defaults), and a tokenizer
// (tests/data/tokenizers/bytelevel_bpe) with tight limits. Checked:
//   - what is accepted is within every limit (ids in the vocabulary, max_tokens, n, prompts × n,
//     prompt tokens, the context, finite sampling parameters in range, logprobs, stop lists) and
//     text-only features were refused without a tokenizer;
//   - what is refused has a message, names a known field (or none), and its error body
//     (api::error_body) is valid JSON of the documented shape, whatever bytes the message holds.
#include "fuzz_util.hpp"

#include "api/http_server.hpp"
#include "api/request.hpp"
#include "model/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>

namespace {

using namespace sy;
using json = nlohmann::json;

struct setup {
  api::request_limits plain;     ///< token ids only
  api::request_limits text;      ///< with a tokenizer, tight limits
};

const setup& limits() {
  static const setup* s = [] {
    auto* st = new setup;
    st->plain.model_name = "fuzz-model";
    st->plain.vocab_size = 512;
    st->plain.max_context = 256;
    auto t = model::tokenizer::load(std::filesystem::path(SY_TEST_DATA) / "tokenizers" / "bytelevel_bpe" / "tokenizer.json");
    SY_FUZZ_CHECK(static_cast<bool>(t), "cannot load the tokenizer fixture");
    st->text = st->plain;
    st->text.tokenizer = new model::tokenizer(std::move(*t));
    st->text.max_context = 0;
    st->text.max_prompt_tokens = 24;
    st->text.max_tokens = 64;
    st->text.max_choices = 4;
    return st;
  }();
  return *s;
}

void check_refusal(const api::bad_request& b, const char* what) {
  static const std::set<std::string> fields = {"",     "model",  "prompt",           "max_tokens",     "temperature",
                                               "top_p", "top_k", "seed",             "n",              "echo",
                                               "stream", "stream_options", "skip_special_tokens", "ignore_eos",
                                               "logprobs", "stop", "stop_token_ids", "add_special_tokens", "tokens"};
  SY_FUZZ_CHECK(!b.message.empty(), "%s: a refusal without a message", what);
  SY_FUZZ_CHECK(fields.count(b.param) == 1, "%s: refusal names unknown field '%s'", what, b.param.c_str());
  const std::string body = api::error_body("invalid_request_error", b.message, b.param);
  const json j = json::parse(body, nullptr, false);
  SY_FUZZ_CHECK(!j.is_discarded(), "%s: the error body is not JSON: %s", what, body.c_str());
  SY_FUZZ_CHECK(j.is_object() && j.contains("error") && j["error"].is_object(), "%s: error body shape", what);
  const auto& e = j["error"];
  SY_FUZZ_CHECK(e.contains("type") && e["type"].is_string() && e.contains("message") && e["message"].is_string() &&
                    e.contains("param") && (e["param"].is_null() || e["param"].is_string()) && e.contains("code"),
                "%s: error body fields: %s", what, body.c_str());
}

void check_ids(const std::vector<int32_t>& ids, const api::request_limits& lim, const char* what) {
  for (int32_t id : ids) SY_FUZZ_CHECK(id >= 0 && id < lim.vocab_size, "%s: id %d accepted, vocab %lld", what, id, (long long)lim.vocab_size);
}

void check_completion(const api::completion_request& r, const api::request_limits& lim) {
  SY_FUZZ_CHECK(!r.prompts.empty(), "completion: no prompt accepted");
  for (const auto& p : r.prompts) {
    SY_FUZZ_CHECK(!p.empty(), "completion: an empty prompt accepted");
    check_ids(p, lim, "completion prompt");
    const auto n = static_cast<int64_t>(p.size());
    if (lim.max_prompt_tokens > 0) SY_FUZZ_CHECK(n <= lim.max_prompt_tokens, "completion: prompt of %lld tokens", (long long)n);
    if (lim.max_context > 0)
      SY_FUZZ_CHECK(n + r.max_tokens <= lim.max_context, "completion: %lld + %d past the context", (long long)n, r.max_tokens);
  }
  SY_FUZZ_CHECK(r.max_tokens >= 0 && r.max_tokens <= lim.max_tokens, "completion: max_tokens %d", r.max_tokens);
  SY_FUZZ_CHECK(r.n >= 1 && r.n <= lim.max_choices, "completion: n %d", r.n);
  SY_FUZZ_CHECK(static_cast<int64_t>(r.prompts.size()) * r.n <= lim.max_choices, "completion: %zu prompts x n %d",
                r.prompts.size(), r.n);
  const auto& s = r.sampling;
  SY_FUZZ_CHECK(std::isfinite(s.temperature) && s.temperature >= 0 && s.temperature <= 100, "temperature %g", s.temperature);
  SY_FUZZ_CHECK(std::isfinite(s.top_p) && s.top_p > 0 && s.top_p <= 1, "top_p %g", s.top_p);
  SY_FUZZ_CHECK(s.top_k >= 0, "top_k %d", s.top_k);
  SY_FUZZ_CHECK(!model::validate(s), "accepted sampling parameters the sampler refuses: %s", model::describe(model::validate(s)).c_str());
  SY_FUZZ_CHECK(r.logprobs >= -1 && r.logprobs <= 20, "logprobs %d", r.logprobs);
  SY_FUZZ_CHECK(!(r.echo && r.logprobs >= 0), "echo with logprobs accepted");
  SY_FUZZ_CHECK(r.stop.size() <= 16, "%zu stop strings", r.stop.size());
  SY_FUZZ_CHECK(r.stop.empty() || lim.tokenizer != nullptr, "stop strings accepted without a tokenizer");
  for (const auto& st : r.stop) SY_FUZZ_CHECK(!st.empty(), "an empty stop string accepted");
  check_ids(r.stop_token_ids, lim, "stop_token_ids");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  limits();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  for (const api::request_limits* lim : {&limits().plain, &limits().text}) {
    auto c = api::parse_completion(body, *lim);
    if (auto* bad = std::get_if<api::bad_request>(&c)) {
      check_refusal(*bad, "completion");
      if (bad->n_prompt_tokens >= 0)
        SY_FUZZ_CHECK(bad->param == "prompt" || bad->param == "max_tokens", "n_prompt_tokens set for '%s'", bad->param.c_str());
    } else {
      check_completion(std::get<api::completion_request>(c), *lim);
    }

    auto t = api::parse_tokenize(body, *lim);
    if (auto* bad = std::get_if<api::bad_request>(&t)) {
      check_refusal(*bad, "tokenize");
    } else {
      SY_FUZZ_CHECK(lim->tokenizer != nullptr, "tokenize accepted without a tokenizer");
      // What the /tokenize route does next with it.
      auto ids = lim->tokenizer->encode(std::get<api::tokenize_request>(t).text, std::get<api::tokenize_request>(t).add_special_tokens);
      if (ids) check_ids(*ids, *lim, "tokenize");
    }

    auto d = api::parse_detokenize(body, *lim);
    if (auto* bad = std::get_if<api::bad_request>(&d)) {
      check_refusal(*bad, "detokenize");
    } else {
      SY_FUZZ_CHECK(lim->tokenizer != nullptr, "detokenize accepted without a tokenizer");
      const auto& ids = std::get<api::detokenize_request>(d).tokens;
      check_ids(ids, *lim, "detokenize");
      const std::string text = lim->tokenizer->decode(ids, false);
      SY_FUZZ_CHECK(sy::fuzz::valid_utf8(text), "detokenize: decode gave invalid UTF-8");
    }
  }
  return 0;
}
