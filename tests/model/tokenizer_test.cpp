#include "model/tokenizer.hpp"

#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <thread>

using namespace sy::model;
using nlohmann::json;
using sy::test::temp_dir;

namespace {

std::filesystem::path tokenizer_dir(const std::string& name) { return sy::test::data_dir() / "tokenizers" / name; }

json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  REQUIRE(in);
  return json::parse(in);
}

/// Strict UTF-8 check, independent of the tokenizer's own.
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n;
    char32_t cp;
    if (c < 0x80) {
      n = 1, cp = c;
    } else if ((c & 0xE0) == 0xC0) {
      n = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 4, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n;
  }
  return true;
}

/// A BPE model whose vocabulary is `tokens` (ids in order) with `merges` ("a b" strings or pairs).
json bpe(const std::vector<std::string>& tokens, json merges = json::array()) {
  json vocab = json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  return {{"type", "BPE"},          {"dropout", nullptr},     {"unk_token", nullptr},
          {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
          {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab},
          {"merges", std::move(merges)}};
}

/// A whole tokenizer.json around `model`; components default to null.
/// Merges in the list form: [["a", "b"], ...].
json pairs(const std::vector<std::pair<std::string, std::string>>& ps) {
  json out = json::array();
  for (const auto& [a, b] : ps) out.push_back(json::array({a, b}));
  return out;
}

json tokenizer_json(json model) {
  return {{"version", "1.0"},        {"truncation", nullptr},   {"padding", nullptr},
          {"added_tokens", json::array()}, {"normalizer", nullptr}, {"pre_tokenizer", nullptr},
          {"post_processor", nullptr}, {"decoder", nullptr},      {"model", std::move(model)}};
}

json added(int id, const std::string& content, bool special, json extra = json::object()) {
  json a = {{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
            {"rstrip", false},  {"normalized", !special}, {"special", special}};
  a.update(extra);
  return a;
}

tokenizer make(const json& j, const std::string& config = {}) {
  auto t = tokenizer::make(j.dump(), config);
  INFO((t ? std::string() : describe(t.error())));
  REQUIRE(t);
  return std::move(*t);
}

std::vector<int32_t> enc(const tokenizer& t, const std::string& text, bool special = false) {
  auto ids = t.encode(text, special);
  INFO(text);
  REQUIRE(ids);
  return *ids;
}

std::vector<std::string> pieces(const tokenizer& t, const std::string& text) {
  auto p = t.pre_tokenize(text);
  REQUIRE(p);
  return *p;
}

std::string load_error(const json& j, const std::string& config = {}) {
  auto t = tokenizer::make(j.dump(), config);
  REQUIRE_FALSE(t);
  return describe(t.error());
}

std::string stream(const tokenizer& t, const std::vector<int32_t>& ids, std::vector<std::string>* parts = nullptr) {
  incremental_decoder d(t);
  std::string all;
  for (int32_t id : ids) {
    auto piece = d.push(id);
    if (parts) parts->push_back(piece);
    all += piece;
  }
  auto rest = d.finish();
  if (parts) parts->push_back(rest);
  return all + rest;
}

}  // namespace

TEST_CASE("tokenizer: every fixture case encodes to its ids and decodes to its text", "[tokenizer]") {
  for (const std::string name : {"bytelevel_bpe", "bytefallback_bpe"}) {
    auto t = tokenizer::load(tokenizer_dir(name));
    INFO(name << ": " << (t ? std::string() : describe(t.error())));
    REQUIRE(t);
    const json cases = read_json(tokenizer_dir(name) / "cases.json");
    REQUIRE(cases.size() >= 20);
    for (const auto& c : cases) {
      const auto text = c["text"].get<std::string>();
      const auto ids = c["ids"].get<std::vector<int32_t>>();
      const auto decoded = c["decoded"].get<std::string>();
      INFO(name << ": " << json(text).dump());
      CHECK(enc(*t, text) == ids);
      // Neither fixture has a post-processor or a tokenizer_config.json: nothing is added.
      CHECK(enc(*t, text, true) == ids);
      CHECK(t->decode(ids, false) == decoded);
    }
  }
}

TEST_CASE("tokenizer: incremental decoding of every fixture case equals the full decode, in valid UTF-8 pieces",
          "[tokenizer]") {
  for (const std::string name : {"bytelevel_bpe", "bytefallback_bpe"}) {
    auto t = tokenizer::load(tokenizer_dir(name));
    REQUIRE(t);
    for (const auto& c : read_json(tokenizer_dir(name) / "cases.json")) {
      const auto ids = c["ids"].get<std::vector<int32_t>>();
      INFO(name << ": " << c["text"].dump());
      std::vector<std::string> parts;
      CHECK(stream(*t, ids, &parts) == c["decoded"].get<std::string>());
      for (const auto& p : parts) {
        CHECK(valid_utf8(p));
        CHECK(p.find("\xEF\xBF\xBD") == std::string::npos);  // no fixture text holds U+FFFD
      }
    }
  }
}

TEST_CASE("tokenizer: incremental decoding holds back a split character and flushes it at the end", "[tokenizer]") {
  auto t = tokenizer::load(tokenizer_dir("bytefallback_bpe"));
  REQUIRE(t);
  const auto c3 = *t->token_to_id("<0xC3>"), a9 = *t->token_to_id("<0xA9>");
  incremental_decoder d(*t);
  CHECK(d.push(c3).empty());
  CHECK(d.push(a9) == "é");
  CHECK(d.push(c3).empty());
  // decode() makes the whole byte run [C3 A9 C3] three U+FFFD (as `tokenizers` does); the stream
  // keeps the "é" it already gave and only the dangling byte becomes U+FFFD.
  CHECK(t->decode(std::vector<int32_t>{c3, a9, c3}, false) == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(d.finish() == "\xEF\xBF\xBD");
  // Likewise when a normal token follows the dangling byte: the stream goes on.
  CHECK(d.push(c3).empty());
  CHECK(d.push(a9) == "é");
  CHECK(d.push(c3).empty());
  CHECK(d.push(*t->token_to_id("a")) == "\xEF\xBF\xBD" "a");
  CHECK(d.finish().empty());
  // After finish the decoder starts afresh.
  CHECK(d.push(c3).empty());
  CHECK(d.push(a9) == "é");
  CHECK(d.finish().empty());
}

TEST_CASE("tokenizer: one tokenizer encodes from several threads at once", "[tokenizer]") {
  auto t = tokenizer::load(tokenizer_dir("bytelevel_bpe"));
  REQUIRE(t);
  const json cases = read_json(tokenizer_dir("bytelevel_bpe") / "cases.json");
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&] {
      for (int round = 0; round < 20; ++round)
        for (const auto& c : cases) {
          auto ids = t->encode(c["text"].get<std::string>(), false);
          if (!ids || *ids != c["ids"].get<std::vector<int32_t>>()) ++mismatches;
        }
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == 0);
}

TEST_CASE("tokenizer: ByteLevel pre-tokenizer with the GPT-2 regex and add_prefix_space", "[tokenizer]") {
  json j = read_json(tokenizer_dir("bytelevel_bpe") / "tokenizer.json");
  auto fixture = make(j);
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  auto gpt2 = make(j);
  CHECK(pieces(gpt2, "Hello world") == std::vector<std::string>{"ĠHello", "Ġworld"});
  CHECK(pieces(gpt2, "don't stop  now 42!?") ==
        std::vector<std::string>{"Ġdon", "'t", "Ġstop", "Ġ", "Ġnow", "Ġ42", "!?"});
  // With the prefix space the pieces are those of the fixture's own regex on " " + text.
  for (std::string text : {"Hello world", "DeepSeek-V3: 671B params", "tabs\tand\nnewlines"})
    CHECK(enc(gpt2, text) == enc(fixture, " " + text));
  // Without it nothing is prepended.
  j["pre_tokenizer"]["add_prefix_space"] = false;
  CHECK(pieces(make(j), "Hello world") == std::vector<std::string>{"Hello", "Ġworld"});
  // use_regex false: one piece, only mapped to byte characters.
  j["pre_tokenizer"]["use_regex"] = false;
  CHECK(pieces(make(j), "a b\n") == std::vector<std::string>{"aĠbĊ"});
}

TEST_CASE("tokenizer: Llama-3, Qwen2 and DeepSeek-V3 style split regexes", "[tokenizer]") {
  auto split = [](const std::string& pattern) {
    json j = tokenizer_json(bpe({"a"}));
    j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}, {"invert", false}};
    return make(j);
  };
  auto llama3 = split(R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re");
  CHECK(pieces(llama3, "Hello world 12345 I'M") == std::vector<std::string>{"Hello", " world", " ", "123", "45", " I", "'M"});
  CHECK(pieces(llama3, "a\n\nb  c") == std::vector<std::string>{"a", "\n\n", "b", " ", " c"});
  auto qwen2 = split(R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re");
  CHECK(pieces(qwen2, "abc 12 !!\n") == std::vector<std::string>{"abc", " ", "1", "2", " !!\n"});
  CHECK(pieces(qwen2, "混合专家 MoE") == std::vector<std::string>{"混合专家", " MoE"});

  // DeepSeek-V3 cuts digits and CJK runs first, then words and punctuation.
  json j = tokenizer_json(bpe({"a"}));
  json seq = json::array();
  for (std::string p : {std::string(R"re(\p{N}{1,3})re"), std::string("[一-龥\u3040-ゟ゠-ヿ]+"),
                        std::string(R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re")})
    seq.push_back({{"type", "Split"}, {"pattern", {{"Regex", p}}}, {"behavior", "Isolated"}, {"invert", false}});
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", seq}};
  CHECK(pieces(make(j), "DeepSeek混合专家12345.py") == std::vector<std::string>{"DeepSeek", "混合专家", "123", "45", ".py"});
}

TEST_CASE("tokenizer: Split pre-tokenizer, each behaviour, string and regex patterns, inverted", "[tokenizer]") {
  auto with = [](const std::string& behavior, bool invert = false, json pattern = {{"String", "-"}}) {
    json j = tokenizer_json(bpe({"a"}));
    j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", pattern}, {"behavior", behavior}, {"invert", invert}};
    return make(j);
  };
  using v = std::vector<std::string>;
  CHECK(pieces(with("Removed"), "a-b-c") == v{"a", "b", "c"});
  CHECK(pieces(with("Isolated"), "a-b-c") == v{"a", "-", "b", "-", "c"});
  CHECK(pieces(with("MergedWithPrevious"), "a-b-c") == v{"a-", "b-", "c"});
  CHECK(pieces(with("MergedWithNext"), "a-b-c") == v{"a", "-b", "-c"});
  CHECK(pieces(with("Contiguous"), "a-b-c") == v{"a", "-", "b", "-", "c"});
  CHECK(pieces(with("Isolated"), "a--b") == v{"a", "-", "-", "b"});
  CHECK(pieces(with("Contiguous"), "a--b") == v{"a", "--", "b"});
  CHECK(pieces(with("MergedWithPrevious"), "a--b") == v{"a-", "-", "b"});
  CHECK(pieces(with("MergedWithNext"), "a--b") == v{"a", "-", "-b"});
  CHECK(pieces(with("Removed", true), "a-b-c") == v{"-", "-"});
  CHECK(pieces(with("MergedWithPrevious", true), "a-b-c") == v{"a", "-b", "-c"});
  CHECK(pieces(with("Isolated", false, {{"Regex", "-+"}}), "a--b") == v{"a", "--", "b"});
  CHECK(pieces(with("Removed", false, {{"Regex", "\\s+"}}), " x  y ") == v{"x", "y"});

  // The model never merges across pieces: "a -" would merge without the split.
  json j = tokenizer_json(bpe({"a", "-", "b", "a-"}, {"a -"}));
  CHECK(enc(make(j), "a-b") == std::vector<int32_t>{3, 2});
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", "Isolated"}, {"invert", false}};
  CHECK(enc(make(j), "a-b") == std::vector<int32_t>{0, 1, 2});
}

TEST_CASE("tokenizer: Metaspace pre-tokenizer and decoder", "[tokenizer]") {
  auto with = [](json meta, bool with_bos = false) {
    json j = tokenizer_json(bpe({"<s>", "▁", "H", "e", "y", "f", "r", "i", "n", "d", "▁H", "▁He", "▁Hey"}, {"▁ H", "▁H e", "▁He y"}));
    meta["type"] = "Metaspace";
    j["pre_tokenizer"] = meta;
    j["decoder"] = meta;
    if (with_bos) j["added_tokens"].push_back(added(0, "<s>", true));
    return make(j);
  };
  using v = std::vector<std::string>;
  auto always = with({{"replacement", "▁"}, {"prepend_scheme", "always"}, {"split", true}});
  CHECK(pieces(always, "Hey friend!") == v{"▁Hey", "▁friend!"});
  CHECK(pieces(always, "Hey   friend!") == v{"▁Hey", "▁", "▁", "▁friend!"});
  CHECK(pieces(always, " Hey") == v{"▁Hey"});
  CHECK(enc(always, "Hey") == std::vector<int32_t>{12});
  CHECK(always.decode(enc(always, "Hey Hey"), false) == "Hey Hey");
  // The decoder drops every ▁ of the first token when it prepends (as `tokenizers` does).
  CHECK(always.decode(std::vector<int32_t>{1, 12}, false) == " Hey");
  CHECK(pieces(with({{"replacement", "▁"}, {"prepend_scheme", "always"}, {"split", false}}), "Hey friend") == v{"▁Hey▁friend"});
  auto never = with({{"replacement", "▁"}, {"prepend_scheme", "never"}, {"split", true}});
  CHECK(pieces(never, "Hey friend") == v{"Hey", "▁friend"});
  CHECK(never.decode(std::vector<int32_t>{1, 12}, false) == "  Hey");
  // Legacy spelling: add_prefix_space instead of prepend_scheme.
  CHECK(pieces(with({{"replacement", "▁"}, {"add_prefix_space", false}}), "Hey friend") == v{"Hey", "▁friend"});
  // "first" prepends only to the piece at the very start of the input.
  auto first = with({{"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", true}}, true);
  CHECK(pieces(first, "Hey friend") == v{"▁Hey", "▁friend"});
  CHECK(pieces(first, "<s>Hey friend") == v{"<s>", "Hey", "▁friend"});
  auto always_bos = with({{"replacement", "▁"}, {"prepend_scheme", "always"}, {"split", true}}, true);
  CHECK(pieces(always_bos, "<s>Hey friend") == v{"<s>", "▁Hey", "▁friend"});
  // Another replacement character.
  CHECK(pieces(with({{"replacement", "_"}, {"prepend_scheme", "always"}}), "a b") == v{"_a", "_b"});
}

TEST_CASE("tokenizer: Unicode normalizers (NFC, NFD, NFKC, NFKD), Lowercase, Strip, StripAccents", "[tokenizer]") {
  auto with = [](json normalizer, std::vector<std::string> vocab = {"a"}) {
    json j = tokenizer_json(bpe(vocab));
    j["normalizer"] = normalizer;
    return make(j);
  };
  using v = std::vector<std::string>;
  const std::string e_acute = "\xC3\xA9", e_combining = "e\xCC\x81";
  auto nfc = with({{"type", "NFC"}}, {e_acute, "x"});
  CHECK(pieces(nfc, e_combining + "x") == v{e_acute + "x"});
  CHECK(enc(nfc, e_combining) == std::vector<int32_t>{0});
  CHECK(pieces(with({{"type", "NFD"}}), e_acute) == v{e_combining});
  CHECK(pieces(with({{"type", "NFKC"}}), "\xEF\xAC\x81" "x\xE2\x91\xA0") == v{"fix1"});       // ﬁ, ①
  CHECK(pieces(with({{"type", "NFKD"}}), "\xE2\x91\xA0" + e_acute) == v{"1" + e_combining});
  CHECK(pieces(with({{"type", "Lowercase"}}), "H\xC3\x89LLO \xC4\xB0") == v{"h\xC3\xA9llo i\xCC\x87"});  // HÉLLO İ
  CHECK(pieces(with({{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}), " \t a b \n") == v{"a b"});
  CHECK(pieces(with({{"type", "Strip"}, {"strip_left", false}, {"strip_right", true}}), "  a  ") == v{"  a"});
  json seq = {{"type", "Sequence"},
              {"normalizers", {{{"type", "NFD"}}, {{"type", "StripAccents"}}, {{"type", "Lowercase"}}}}};
  CHECK(pieces(with(seq), "Caf" + e_acute) == v{"cafe"});
  // A normalizer changing lengths keeps "first" working: the piece still starts the input.
  json j = tokenizer_json(bpe({"a"}));
  j["normalizer"] = {{"type", "NFC"}};
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}};
  CHECK(pieces(make(j), e_combining + " x") == v{"▁" + e_acute, "▁x"});
}

TEST_CASE("tokenizer: Prepend, Replace (string and regex) normalizers", "[tokenizer]") {
  json j = tokenizer_json(bpe({"a"}));
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers",
                      {{{"type", "Replace"}, {"pattern", {{"Regex", "\\s+"}}}, {"content", " "}},
                       {{"type", "Prepend"}, {"prepend", "▁"}},
                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}};
  auto t = make(j);
  CHECK(pieces(t, "a \t\n b") == std::vector<std::string>{"▁a▁b"});
  CHECK(pieces(t, "").empty());  // Prepend leaves empty text alone
}

TEST_CASE("tokenizer: Digits, Punctuation, Whitespace, WhitespaceSplit pre-tokenizers", "[tokenizer]") {
  auto with = [](json pre) {
    json j = tokenizer_json(bpe({"a"}));
    j["pre_tokenizer"] = pre;
    return make(j);
  };
  using v = std::vector<std::string>;
  CHECK(pieces(with({{"type", "Digits"}, {"individual_digits", true}}), "ab123c") == v{"ab", "1", "2", "3", "c"});
  CHECK(pieces(with({{"type", "Digits"}, {"individual_digits", false}}), "ab123c4") == v{"ab", "123", "c", "4"});
  CHECK(pieces(with({{"type", "Punctuation"}, {"behavior", "Isolated"}}), "Hi, you!?") == v{"Hi", ",", " you", "!", "?"});
  CHECK(pieces(with({{"type", "Punctuation"}, {"behavior", "Contiguous"}}), "Hi!?") == v{"Hi", "!?"});
  CHECK(pieces(with({{"type", "Whitespace"}}), "Hey, friend!! ok") == v{"Hey", ",", "friend", "!!", "ok"});
  CHECK(pieces(with({{"type", "WhitespaceSplit"}}), " Hey,\tfriend  ") == v{"Hey,", "friend"});
}

TEST_CASE("tokenizer: added tokens, special and not, longest first, lstrip/rstrip/single_word/normalized", "[tokenizer]") {
  std::vector<std::string> vocab;
  for (char c = 'a'; c <= 'z'; ++c) vocab.emplace_back(1, c);
  vocab.push_back(" ");  // id 26
  vocab.push_back("<");  // id 27
  vocab.push_back(">");  // id 28
  vocab.push_back("|");  // id 29
  json j = tokenizer_json(bpe(vocab));
  j["added_tokens"] = {added(100, "<|x|>", true), added(101, "<|xy|>", true), added(102, "hello", false, {{"single_word", true}}),
                       added(103, "[L]", true, {{"lstrip", true}}), added(104, "[R]", true, {{"rstrip", true}}),
                       added(105, "<|X|>", true)};
  j["decoder"] = {{"type", "Fuse"}};
  auto t = make(j);
  using ids = std::vector<int32_t>;
  const int32_t a = 0, b = 1, sp = 26;
  CHECK(enc(t, "a<|xy|>b") == ids{a, 101, b});
  CHECK(enc(t, "a<|x|>b") == ids{a, 100, b});
  CHECK(enc(t, "<|x|><|xy|>") == ids{100, 101});
  CHECK(enc(t, "hello b") == ids{102, sp, b});
  CHECK(enc(t, "ahello") == ids{0, 7, 4, 11, 11, 14});  // inside a word: not matched
  CHECK(enc(t, "a  [L]b") == ids{a, 103, b});
  CHECK(enc(t, "a[R]  b") == ids{a, 104, b});
  CHECK(enc(t, "a [R] b") == ids{a, sp, 104, b});
  CHECK(t.decode(ids{a, 100, b}, false) == "a<|x|>b");
  CHECK(t.decode(ids{a, 100, b, 102}, true) == "abhello");  // 102 is not special
  CHECK(t.is_special(100));
  CHECK_FALSE(t.is_special(102));
  CHECK(t.token_to_id("<|xy|>") == 101);
  CHECK(t.id_to_token(102) == "hello");
  CHECK(t.vocab_size() == 106);

  // normalized tokens are matched after normalization, the others on the raw text.
  j["normalizer"] = {{"type", "Lowercase"}};
  auto lower = make(j);
  CHECK(enc(lower, "HELLO b") == ids{102, sp, b});
  CHECK(enc(lower, "<|X|>") == ids{105});  // special, not normalized: matched before lowercasing
}

TEST_CASE("tokenizer: TemplateProcessing adds BOS/EOS only with add_special_tokens", "[tokenizer]") {
  json j = tokenizer_json(bpe({"<s>", "</s>", "a", "b"}));
  j["added_tokens"] = {added(0, "<s>", true), added(1, "</s>", true)};
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair", json::array()},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {0}}, {"tokens", {"<s>"}}}}}}};
  using ids = std::vector<int32_t>;
  auto t = make(j);
  CHECK(enc(t, "ab", true) == ids{0, 2, 3});
  CHECK(enc(t, "ab", false) == ids{2, 3});
  CHECK(enc(t, "", true) == ids{0});
  j["post_processor"]["single"].push_back({{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}});
  j["post_processor"]["special_tokens"]["</s>"] = {{"id", "</s>"}, {"ids", {1}}, {"tokens", {"</s>"}}};
  CHECK(enc(make(j), "ab", true) == ids{0, 2, 3, 1});
  // Wrapped in a Sequence with ByteLevel, as DeepSeek-V3 and Llama-3 files have it.
  json seq = {{"type", "Sequence"}, {"processors", {{{"type", "ByteLevel"}, {"trim_offsets", false}}, j["post_processor"]}}};
  j["post_processor"] = seq;
  CHECK(enc(make(j), "ab", true) == ids{0, 2, 3, 1});

  // No post-processor: tokenizer_config.json's add_bos_token / add_eos_token decide.
  j["post_processor"] = nullptr;
  auto cfg = make(j, R"({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "add_bos_token": true,
                         "add_eos_token": false, "model_max_length": 4096, "chat_template": "{{ bos_token }}"})");
  CHECK(enc(cfg, "ab", true) == ids{0, 2, 3});
  CHECK(enc(cfg, "ab", false) == ids{2, 3});
  CHECK(cfg.bos_id() == 0);
  CHECK(cfg.eos_id() == 1);
  CHECK(cfg.settings().model_max_length == 4096);
  CHECK(cfg.settings().chat_template == "{{ bos_token }}");
  CHECK(cfg.settings().add_eos_token == false);
  auto unlimited = make(j, R"({"model_max_length": 1e30, "chat_template": [{"name": "default", "template": "T"}]})");
  CHECK_FALSE(unlimited.settings().model_max_length);
  CHECK(unlimited.settings().chat_template == "T");
  CHECK(enc(unlimited, "ab", true) == ids{2, 3});
}

TEST_CASE("tokenizer: BPE merges apply by rank, in string and list form", "[tokenizer]") {
  const std::vector<std::string> vocab{"a", "b", "c", "ab", "bc", "abc"};
  using ids = std::vector<int32_t>;
  CHECK(enc(make(tokenizer_json(bpe(vocab, {"b c", "a b", "a bc"}))), "abc") == ids{5});
  CHECK(enc(make(tokenizer_json(bpe(vocab, {"a b", "b c", "a bc"}))), "abc") == ids{3, 2});
  CHECK(enc(make(tokenizer_json(bpe(vocab, pairs({{"b", "c"}, {"a", "b"}, {"a", "bc"}})))), "abc") == ids{5});
  CHECK(enc(make(tokenizer_json(bpe(vocab, pairs({{"a", "b"}, {"b", "c"}, {"a", "bc"}})))), "abcabc") == ids{3, 2, 3, 2});
  // The list form can hold tokens with spaces, which the "a b" form cannot.
  CHECK(enc(make(tokenizer_json(bpe({"a", " ", "b", "a ", "a b"}, pairs({{"a", " "}, {"a ", "b"}})))), "a b") == ids{4});
  // Leftmost first among equal ranks: "aaa" → "aa" + "a".
  CHECK(enc(make(tokenizer_json(bpe({"a", "aa"}, {"a a"}))), "aaaaa") == ids{1, 1, 0});
}

TEST_CASE("tokenizer: BPE options: byte_fallback, unk_token, fuse_unk, prefix/suffix, ignore_merges", "[tokenizer]") {
  using ids = std::vector<int32_t>;
  json m = bpe({"<unk>", "a", "<0xC3>", "<0xA9>"});
  m["unk_token"] = "<unk>";
  m["byte_fallback"] = true;
  json j = tokenizer_json(m);
  j["decoder"] = {{"type", "Sequence"}, {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}};
  auto fb = make(j);
  CHECK(enc(fb, "a\xC3\xA9") == ids{1, 2, 3});
  CHECK(enc(fb, "a\xE2\x82\xAC") == ids{1, 0});  // € has no byte tokens: unk
  CHECK(enc(fb, "\xE2\x82\xAC\xE2\x82\xAC" "a") == ids{0, 0, 1});
  CHECK(fb.decode(ids{1, 2, 3}, false) == "a\xC3\xA9");
  CHECK(fb.decode(ids{2, 1}, false) == "\xEF\xBF\xBD" "a");
  CHECK(fb.decode(ids{2, 2, 1}, false) == "\xEF\xBF\xBD\xEF\xBF\xBD" "a");  // one U+FFFD per byte
  j["model"]["fuse_unk"] = true;
  CHECK(enc(make(j), "\xE2\x82\xAC\xE2\x82\xAC" "a") == ids{0, 1});
  j["model"]["byte_fallback"] = false;
  CHECK(enc(make(j), "\xC3\xA9" "a") == ids{0, 1});
  j["model"]["unk_token"] = nullptr;
  CHECK(enc(make(j), "\xC3\xA9" "a") == ids{1});  // no unk token: the character is dropped

  json wp = bpe({"h", "##e", "##l", "##o", "he", "##lo"}, {"h ##e", "##l ##o"});
  wp["continuing_subword_prefix"] = "##";
  CHECK(enc(make(tokenizer_json(wp)), "helo") == ids{4, 5});
  json sfx = bpe({"a", "b</w>", "ab</w>"}, {"a b</w>"});
  sfx["end_of_word_suffix"] = "</w>";
  json js = tokenizer_json(sfx);
  js["decoder"] = {{"type", "BPEDecoder"}, {"suffix", "</w>"}};
  auto t = make(js);
  CHECK(enc(t, "ab") == ids{2});
  CHECK(t.decode(ids{2, 2}, false) == "ab ab");

  json im = bpe({"a", "b", "c", "ab", "abc"}, {"a b"});
  CHECK(enc(make(tokenizer_json(im)), "abc") == ids{3, 2});
  im["ignore_merges"] = true;
  CHECK(enc(make(tokenizer_json(im)), "abc") == ids{4});
}

TEST_CASE("tokenizer: decoders Strip, Replace (regex), ByteLevel with added tokens", "[tokenizer]") {
  json j = tokenizer_json(bpe({" ab ", "x_y", "z"}));
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"Regex", "_+"}}}, {"content", "-"}},
                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 1}}}}};
  auto t = make(j);
  CHECK(t.decode(std::vector<int32_t>{0, 1, 2}, false) == "abx-yz");
  j["decoder"] = nullptr;
  CHECK(make(j).decode(std::vector<int32_t>{1, 2}, false) == "x_y z");  // no decoder: joined by spaces

  // ByteLevel decodes an added token outside the byte alphabet as its own text.
  json bl = read_json(tokenizer_dir("bytelevel_bpe") / "tokenizer.json");
  bl["added_tokens"].push_back(added(600, "<｜begin▁of▁sentence｜>", true));
  auto b = make(bl);
  CHECK(enc(b, "<｜begin▁of▁sentence｜>Hello") == std::vector<int32_t>{600, 42, 296, 479});
  CHECK(b.decode(std::vector<int32_t>{600, 42, 296, 479}, false) == "<｜begin▁of▁sentence｜>Hello");
  CHECK(b.decode(std::vector<int32_t>{600, 42, 296, 479}, true) == "Hello");
  CHECK(b.decode(std::vector<int32_t>{42, 999999, -5, 296, 479}, false) == "Hello");  // unknown ids are skipped
}

TEST_CASE("tokenizer: encode rejects invalid UTF-8", "[tokenizer]") {
  auto t = tokenizer::load(tokenizer_dir("bytelevel_bpe"));
  REQUIRE(t);
  auto r = t->encode("ab\xC3(", false);
  REQUIRE_FALSE(r);
  CHECK(describe(r.error()).find("UTF-8") != std::string::npos);
}

TEST_CASE("tokenizer: malformed or unsupported tokenizer.json gives an error naming the file and key", "[tokenizer]") {
  auto base = tokenizer_json(bpe({"a", "b", "ab"}, {"a b"}));
  auto contains = [](const std::string& msg, const std::string& part) {
    INFO(msg);
    CHECK(msg.find(part) != std::string::npos);
  };
  json j = base;
  j["model"]["type"] = "WordPiece";
  contains(load_error(j), "tokenizer.json: model.type \"WordPiece\" is not supported");
  j = base;
  j["model"]["type"] = "Unigram";
  contains(load_error(j), "tokenizer.json: model.type \"Unigram\" is not supported");
  j = base;
  j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}};
  contains(load_error(j), "tokenizer.json: normalizer.type \"Precompiled\" is not supported");
  j = base;
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Digits"}}, {{"type", "UnicodeScripts"}}}}};
  contains(load_error(j), "tokenizer.json: pre_tokenizer.pretokenizers[1].type \"UnicodeScripts\" is not supported");
  j = base;
  j["decoder"] = {{"type", "CTC"}};
  contains(load_error(j), "tokenizer.json: decoder.type \"CTC\" is not supported");
  j = base;
  j["post_processor"] = {{"type", "Bogus"}};
  contains(load_error(j), "tokenizer.json: post_processor.type \"Bogus\" is not supported");
  j = base;
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", "Sideways"}};
  contains(load_error(j), "tokenizer.json: pre_tokenizer.behavior \"Sideways\" is not one of");
  j = base;
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  contains(load_error(j), "tokenizer.json: pre_tokenizer.pattern.Regex \"(unclosed\" does not compile");
  j = base;
  j["model"]["merges"] = {"a c"};
  contains(load_error(j), "tokenizer.json: model.merges[0] token \"c\" is not in the vocabulary");
  j = base;
  j["model"]["merges"] = {"ab"};
  contains(load_error(j), "tokenizer.json: model.merges[0]");
  j = base;
  j["model"].erase("vocab");
  contains(load_error(j), "tokenizer.json: model.vocab is missing");
  j = base;
  j.erase("model");
  contains(load_error(j), "tokenizer.json: model is missing");
  j = base;
  j["model"]["unk_token"] = "<unk>";
  contains(load_error(j), "tokenizer.json: model.unk_token \"<unk>\" is not in the vocabulary");
  j = base;
  j["model"]["dropout"] = 0.1;
  contains(load_error(j), "tokenizer.json: model.dropout is not supported");
  j = base;
  j["normalizer"] = {{"prepend", "x"}};
  contains(load_error(j), "tokenizer.json: normalizer.type is missing");
  contains(load_error(base, R"({"add_bos_token": "yes"})"), "tokenizer_config.json: add_bos_token must be true or false");
  contains(load_error(base, R"({"add_bos_token": true, "bos_token": "<s>"})"),
           "tokenizer_config.json: add_bos_token is true but bos_token \"<s>\" is not a token of tokenizer.json");

  auto bad = tokenizer::make("{not json", {});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code() == static_cast<uint8_t>(model_errc::bad_format));
  contains(describe(bad.error()), "tokenizer.json: not valid JSON");

  auto missing = tokenizer::load("/nonexistent/tokenizer-dir");
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == static_cast<uint8_t>(model_errc::io_error));
  contains(describe(missing.error()), "/nonexistent/tokenizer-dir");
}

TEST_CASE("tokenizer: load from a folder reads tokenizer_config.json and chat_template.jinja", "[tokenizer]") {
  temp_dir tmp;
  json j = read_json(tokenizer_dir("bytelevel_bpe") / "tokenizer.json");
  std::ofstream(tmp.path / "tokenizer.json") << j.dump();
  std::ofstream(tmp.path / "tokenizer_config.json") << R"({"bos_token": null, "eos_token": "<|im_end|>", "model_max_length": 32768})";
  std::ofstream(tmp.path / "chat_template.jinja") << "{% for m in messages %}{{ m.content }}{% endfor %}";
  for (const auto& path : {tmp.path, tmp.path / "tokenizer.json"}) {
    auto t = tokenizer::load(path);
    REQUIRE(t);
    CHECK(t->eos_id() == 2);
    CHECK_FALSE(t->bos_id());
    CHECK(t->settings().model_max_length == 32768);
    CHECK(t->settings().chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}");
  }
  std::ofstream(tmp.path / "tokenizer_config.json") << R"({"eos_token": 7})";
  auto bad = tokenizer::load(tmp.path);
  REQUIRE_FALSE(bad);
  CHECK(describe(bad.error()) == (tmp.path / "tokenizer_config.json").string() +
                                     ": eos_token must be a string, an object with \"content\", or null");
}

TEST_CASE("tokenizer: switchyard tokenize encodes and decodes JSON lines", "[tokenizer][cli]") {
  const auto dir = tokenizer_dir("bytelevel_bpe").string();
  const json cases = read_json(tokenizer_dir("bytelevel_bpe") / "cases.json");
  temp_dir tmp;
  std::string input, expected;
  for (const auto& c : cases) {
    input += c["text"].dump() + "\n";
    expected += c["ids"].dump() + "\n";
  }
  std::ofstream(tmp.path / "in.txt") << input;
  auto r = sy::test::run(sy::test::binary() + " tokenize --tokenizer " + dir + " < " + (tmp.path / "in.txt").string());
  CHECK(r.status == 0);
  CHECK(r.output == expected);

  std::string ids_in, texts;
  for (const auto& c : cases) {
    ids_in += c["ids"].dump() + "\n";
    texts += c["decoded"].dump(-1, ' ', false) + "\n";
  }
  std::ofstream(tmp.path / "ids.txt") << ids_in;
  r = sy::test::run(sy::test::binary() + " tokenize --decode --tokenizer " + dir + "/tokenizer.json < " + (tmp.path / "ids.txt").string());
  CHECK(r.status == 0);
  CHECK(r.output == texts);

  // A bad line stops with its number.
  std::ofstream(tmp.path / "bad.txt") << "\"fine\"\n[1, 2]\n";
  r = sy::test::run(sy::test::binary() + " tokenize --tokenizer " + dir + " < " + (tmp.path / "bad.txt").string());
  CHECK(r.status != 0);
  auto t = tokenizer::load(dir);
  REQUIRE(t);
  CHECK(r.output.find(json(enc(*t, "fine")).dump() + "\n") == 0);  // lines before the bad one are printed
  CHECK(r.output.find("line 2") != std::string::npos);
  std::ofstream(tmp.path / "bad_ids.txt") << "[1, -3]\n";
  r = sy::test::run(sy::test::binary() + " tokenize --decode --tokenizer " + dir + " < " + (tmp.path / "bad_ids.txt").string());
  CHECK(r.status != 0);
  CHECK(r.output.find("line 1") != std::string::npos);

  // --add-special-tokens applies the post-processor.
  json j = read_json(tokenizer_dir("bytelevel_bpe") / "tokenizer.json");
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<|im_start|>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"<|im_start|>", {{"id", "<|im_start|>"}, {"ids", {1}}, {"tokens", {"<|im_start|>"}}}}}}};
  std::ofstream(tmp.path / "tokenizer.json") << j.dump();
  std::ofstream(tmp.path / "one.txt") << "\"Hello world\"\n";
  r = sy::test::run(sy::test::binary() + " tokenize --tokenizer " + tmp.path.string() + " --add-special-tokens < " + (tmp.path / "one.txt").string());
  CHECK(r.status == 0);
  CHECK(r.output == "[1,42,296,479,223,89,294,78,70]\n");
  r = sy::test::run(sy::test::binary() + " tokenize --tokenizer " + tmp.path.string() + " < " + (tmp.path / "one.txt").string());
  CHECK(r.output == "[42,296,479,223,89,294,78,70]\n");

  r = sy::test::run(sy::test::binary() + " tokenize --tokenizer /nonexistent < /dev/null");
  CHECK(r.status != 0);
  CHECK(r.output.find("/nonexistent") != std::string::npos);
}

TEST_CASE("tokenizer: truncation and padding of tokenizer.json apply to one sequence", "[tokenizer]") {
  json j = tokenizer_json(bpe({"<s>", "a", "b", "c", "d", "<pad>"}));
  j["added_tokens"] = {added(0, "<s>", true), added(5, "<pad>", true)};
  j["post_processor"] = {{"type", "RobertaProcessing"}, {"cls", {"<s>", 0}}, {"sep", {"<s>", 0}}};
  j["truncation"] = {{"direction", "Right"}, {"max_length", 4}, {"strategy", "LongestFirst"}, {"stride", 0}};
  using ids = std::vector<int32_t>;
  CHECK(enc(make(j), "abcd") == ids{1, 2, 3, 4});
  CHECK(enc(make(j), "abcd", true) == ids{0, 1, 2, 0});  // room is kept for the two added tokens
  j["truncation"]["direction"] = "Left";
  CHECK(enc(make(j), "abcd") == ids{1, 2, 3, 4});
  CHECK(enc(make(j), "abcdab") == ids{3, 4, 1, 2});
  j["truncation"] = nullptr;
  j["padding"] = {{"strategy", {{"Fixed", 6}}}, {"direction", "Right"}, {"pad_to_multiple_of", nullptr},
                  {"pad_id", 5}, {"pad_type_id", 0}, {"pad_token", "<pad>"}};
  CHECK(enc(make(j), "ab") == ids{1, 2, 5, 5, 5, 5});
  j["padding"]["strategy"] = "BatchLongest";
  j["padding"]["pad_to_multiple_of"] = 4;
  j["padding"]["direction"] = "Left";
  CHECK(enc(make(j), "abcda") == ids{5, 5, 5, 1, 2, 3, 4, 1});
}

TEST_CASE("tokenizer: Append and ByteLevel normalizers, BertPreTokenizer, CharDelimiterSplit", "[tokenizer]") {
  auto with = [](const char* key, json part) {
    json j = tokenizer_json(bpe({"a"}));
    j[key] = part;
    return make(j);
  };
  using v = std::vector<std::string>;
  CHECK(pieces(with("normalizer", {{"type", "Append"}, {"append", "</w>"}}), "ab") == v{"ab</w>"});
  CHECK(pieces(with("normalizer", {{"type", "ByteLevel"}}), "a b\xC3\xA9") == v{"aĠbÃ©"});
  CHECK(pieces(with("pre_tokenizer", {{"type", "BertPreTokenizer"}}), "Hi, you  there!") == v{"Hi", ",", "you", "there", "!"});
  CHECK(pieces(with("pre_tokenizer", {{"type", "CharDelimiterSplit"}, {"delimiter", "|"}}), "a|b||c") == v{"a", "b", "c"});
}
