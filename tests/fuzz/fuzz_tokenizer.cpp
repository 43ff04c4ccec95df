// Fuzz target: the tokenizer (model/tokenizer.hpp) on arbitrary bytes, with the two fixture
// tokenizer.json files (tests/data/tokenizers): a GPT-2 style byte-level BPE and a
// SentencePiece-style BPE with byte fallback.
//
// Per input, for each tokenizer: the bytes as text through `encode` (with and without special
// tokens) and `pre_tokenize`; the same bytes as token ids (little-endian u16 pairs, mapped onto
// [-2, vocab_size + 2) so unknown and negative ids occur) through `decode` (skipping special tokens
// and not) and an `incremental_decoder`. Checked, as the header promises:
//   - encode fails exactly on invalid UTF-8 (or when the regex engine gives up); when it succeeds
//     every id is in [0, vocab_size); pre_tokenize succeeds exactly when encode does, and its
//     pieces are valid UTF-8;
//   - the byte-level tokenizer is lossless: decode(encode(text)) == text;
//   - decode's output is valid UTF-8;
//   - every incremental piece is valid UTF-8, and pieces + finish equal decode of all ids whenever
//     that decode has no U+FFFD (the one documented exception needs one).
#include "fuzz_util.hpp"

#include "model/tokenizer.hpp"

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

using sy::fuzz::valid_utf8;

struct loaded {
  const sy::model::tokenizer* tok;
  bool lossless;  ///< decode(encode(text)) == text holds for this tokenizer
  const char* name;
};

std::vector<loaded>& tokenizers() {
  static std::vector<loaded>* all = [] {
    auto* v = new std::vector<loaded>;
    const std::filesystem::path root = SY_TEST_DATA;
    for (auto [dir, lossless] : {std::pair{"bytelevel_bpe", true}, std::pair{"bytefallback_bpe", false}}) {
      auto t = sy::model::tokenizer::load(root / "tokenizers" / dir / "tokenizer.json");
      if (!t) {
        std::fprintf(stderr, "cannot load the %s fixture: %s\n", dir, sy::model::describe(t.error()).c_str());
        std::abort();
      }
      v->push_back({new sy::model::tokenizer(std::move(*t)), lossless, dir});
    }
    return v;
  }();
  return *all;
}

void text_checks(const loaded& l, std::string_view text) {
  const auto& tok = *l.tok;
  const bool utf8 = valid_utf8(text);
  for (bool special : {false, true}) {
    auto ids = tok.encode(text, special);
    if (!ids) {
      const std::string why = sy::model::describe(ids.error());
      SY_FUZZ_CHECK(!utf8 || why.find("regex engine gave up") != std::string::npos,
                    "%s: encode refused valid UTF-8: %s", l.name, why.c_str());
      continue;
    }
    SY_FUZZ_CHECK(utf8, "%s: encode accepted invalid UTF-8", l.name);
    for (int32_t id : *ids)
      SY_FUZZ_CHECK(id >= 0 && id < tok.vocab_size(), "%s: encode gave id %d, vocab_size %d", l.name, id, tok.vocab_size());
    if (l.lossless && !special) {
      const std::string back = tok.decode(*ids, false);
      SY_FUZZ_CHECK(back == text, "%s: decode(encode(text)) differs: %zu bytes in, %zu out", l.name, text.size(),
                    back.size());
    }
  }
  auto pieces = tok.pre_tokenize(text);
  SY_FUZZ_CHECK(static_cast<bool>(pieces) == utf8 || (!pieces && sy::model::describe(pieces.error()).find("regex") != std::string::npos),
                "%s: pre_tokenize %s on %s UTF-8", l.name, pieces ? "succeeded" : "failed", utf8 ? "valid" : "invalid");
  if (pieces)
    for (const auto& p : *pieces) SY_FUZZ_CHECK(valid_utf8(p), "%s: pre_tokenize gave a piece of invalid UTF-8", l.name);
}

void id_checks(const loaded& l, const std::vector<int32_t>& ids) {
  const auto& tok = *l.tok;
  for (bool skip : {false, true}) {
    const std::string all = tok.decode(ids, skip);
    SY_FUZZ_CHECK(valid_utf8(all), "%s: decode (skip_special_tokens=%d) gave invalid UTF-8", l.name, skip);
    sy::model::incremental_decoder dec(tok, skip);
    std::string joined;
    for (int32_t id : ids) {
      const std::string piece = dec.push(id);
      SY_FUZZ_CHECK(valid_utf8(piece), "%s: incremental piece of invalid UTF-8 (skip=%d)", l.name, skip);
      joined += piece;
    }
    const std::string tail = dec.finish();
    SY_FUZZ_CHECK(valid_utf8(tail), "%s: incremental finish gave invalid UTF-8 (skip=%d)", l.name, skip);
    joined += tail;
    if (all.find("\xEF\xBF\xBD") == std::string::npos)
      SY_FUZZ_CHECK(joined == all, "%s: incremental text (%zu bytes) differs from decode (%zu bytes), skip=%d", l.name,
                    joined.size(), all.size(), skip);
    // Reused after finish, it starts afresh.
    std::string again;
    for (int32_t id : ids) again += dec.push(id);
    again += dec.finish();
    SY_FUZZ_CHECK(again == joined, "%s: a finished incremental decoder does not start afresh", l.name);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tokenizers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (const auto& l : tokenizers()) {
    text_checks(l, text);
    std::vector<int32_t> ids;
    const int64_t range = int64_t{l.tok->vocab_size()} + 4;
    for (size_t i = 0; i + 1 < size; i += 2) {
      const int64_t v = data[i] | data[i + 1] << 8;
      ids.push_back(static_cast<int32_t>(v % range - 2));
    }
    id_checks(l, ids);
  }
  return 0;
}
