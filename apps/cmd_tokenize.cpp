// switchyard tokenize: text ↔ token ids through a tokenizer.json, one JSON value per line.
#include "apps/cli.hpp"
#include "apps/commands.hpp"
#include "model/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <iostream>
#include <memory>

namespace sy::apps {

namespace {

namespace m = sy::model;
using nlohmann::json;

void run_tokenize(const m::tokenizer& tok, bool add_special) {
  std::string line;
  for (size_t n = 1; std::getline(std::cin, line); ++n) {
    const json v = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!v.is_string()) fail("line " + std::to_string(n) + ": expected a JSON string (one per line), e.g. \"Hello world\"");
    auto ids = tok.encode(v.get_ref<const std::string&>(), add_special);
    if (!ids) fail("line " + std::to_string(n) + ": " + m::describe(ids.error()));
    std::cout << json(*ids).dump() << '\n' << std::flush;
  }
}

void run_detokenize(const m::tokenizer& tok, bool skip_special) {
  std::string line;
  std::vector<int32_t> ids;
  for (size_t n = 1; std::getline(std::cin, line); ++n) {
    const json v = json::parse(line, nullptr, /*allow_exceptions=*/false);
    bool ok = v.is_array();
    ids.clear();
    if (ok)
      for (const auto& x : v) {
        ok = ok && x.is_number_integer() && x.get<int64_t>() >= 0 && x.get<int64_t>() <= INT32_MAX;
        if (!ok) break;
        ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
      }
    if (!ok) fail("line " + std::to_string(n) + ": expected a JSON array of token ids (non-negative integers), e.g. [15496, 995]");
    std::cout << json(tok.decode(ids, skip_special)).dump(-1, ' ', false) << '\n' << std::flush;
  }
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "tokenize", "Read JSON strings from stdin, one per line, and print each one's token ids as a JSON array (--decode: the reverse)");
  struct args {
    std::string tokenizer;
    bool decode = false, add_special = false, skip_special = false;
  };
  auto a = std::make_shared<args>();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json, or a model folder holding it (and tokenizer_config.json)")->required();
  auto* dec = cmd->add_flag("--decode", a->decode, "Read JSON arrays of token ids and print the decoded JSON strings");
  cmd->add_flag("--add-special-tokens", a->add_special, "When encoding, add the tokens the post-processor or BOS/EOS settings ask for")
      ->excludes(dec);
  cmd->add_flag("--skip-special-tokens", a->skip_special, "When decoding, leave special tokens out")->needs(dec);
  cmd->callback([a] {
    auto tok = m::tokenizer::load(a->tokenizer);
    if (!tok) fail(m::describe(tok.error()));
    if (a->decode)
      run_detokenize(*tok, a->skip_special);
    else
      run_tokenize(*tok, a->add_special);
  });
}

}  // namespace sy::apps
