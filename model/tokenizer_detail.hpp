#pragma once
// Internal to the tokenizer (model/tokenizer*.cpp): UTF-8 and Unicode helpers, the regex adapter,
// the pipeline's components and the BPE model. Not a public header: it pulls in nlohmann/json.
#include "model/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sy::model::tok {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// UTF-8 and Unicode properties

/// Byte length of the UTF-8 sequence starting with `lead` (1 for a stray byte).
[[nodiscard]] size_t utf8_len(unsigned char lead);
/// The code point at s[i] of valid UTF-8; stores its byte length in `len`.
[[nodiscard]] char32_t utf8_at(std::string_view s, size_t i, size_t& len);
[[nodiscard]] bool utf8_valid(std::string_view s);
void utf8_append(std::string& out, char32_t c);
/// Like Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD.
[[nodiscard]] std::string utf8_lossy(std::string_view bytes);
/// True when `s` ends with U+FFFD.
[[nodiscard]] bool ends_with_replacement_char(std::string_view s);

[[nodiscard]] bool is_whitespace(char32_t c);   ///< Unicode White_Space (Rust's char::is_whitespace)
[[nodiscard]] bool is_numeric(char32_t c);      ///< Nd, Nl, No (Rust's char::is_numeric)
[[nodiscard]] bool is_punctuation(char32_t c);  ///< ASCII punctuation or P* (tokenizers' is_punc)
[[nodiscard]] bool is_word_char(char32_t c);    ///< regex \w: letters, marks, digits, connectors
[[nodiscard]] bool is_mark(char32_t c);         ///< M* (combining marks)


// ---------------------------------------------------------------------------------------------
// Regex (Oniguruma, the engine `tokenizers` itself uses, with the same defaults)

class regex {
 public:
  /// Compiles `pattern`; on failure returns nothing and sets `error` to the engine's message.
  [[nodiscard]] static std::optional<regex> compile(std::string_view pattern, std::string& error);
  /// Appends every match [begin, end) in `text`, left to right, not overlapping; an empty match
  /// right after the previous match is skipped by one character (the `onig` crate's iteration).
  /// Returns false when the engine gave up (retry or stack limit).
  [[nodiscard]] bool find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;
  /// Replaces every match with `with`.
  [[nodiscard]] bool replace_all(std::string_view text, std::string_view with, std::string& out) const;

 private:
  struct compiled;
  std::shared_ptr<const compiled> c_;
};

// ---------------------------------------------------------------------------------------------
// Loading: errors are thrown as load_error inside the parser and become caf::error at its edge.

struct load_error {
  model_errc code;
  std::string message;  ///< "<key path> <what is wrong>"
};
[[noreturn]] void fail_at(model_errc code, const std::string& path, const std::string& what);

/// Accessors that throw load_error naming `path.key`.
const json* find_key(const json& obj, const char* key);  ///< null when absent or JSON null
const json& require_key(const json& obj, const char* key, const std::string& path);
std::string get_string(const json& obj, const char* key, const std::string& path);
std::optional<std::string> get_opt_string(const json& obj, const char* key, const std::string& path);
bool get_bool(const json& obj, const char* key, const std::string& path, bool fallback);
int64_t get_int(const json& obj, const char* key, const std::string& path, int64_t fallback, int64_t lo, int64_t hi);
/// A single code point given as a one-character string (Metaspace's replacement, Strip's content).
char32_t get_char(const json& obj, const char* key, const std::string& path, char32_t fallback);
std::string quote(const std::string& s);

// ---------------------------------------------------------------------------------------------
// Text with its alignment to the original input

/// A piece of text as it goes through normalization and pre-tokenization. `orig[i]` is the byte
/// offset, in the text passed to encode, of the character byte i came from (inserted characters
/// take the offset of their neighbour). Only the start of a piece is ever looked at (Metaspace's
/// prepend_scheme "first" asks whether a piece starts the input).
struct nstring {
  std::string text;
  std::vector<uint32_t> orig;

  [[nodiscard]] nstring slice(size_t begin, size_t end) const;
  void append(std::string_view s, uint32_t at);
};

/// A pattern match list covering a text: spans with a flag saying whether the span matched.
struct span_match {
  size_t begin, end;
  bool matched;
};

enum class split_behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };
split_behavior parse_behavior(const json& obj, const char* key, const std::string& path, split_behavior fallback);
/// Applies a split behaviour to `matches` (covering `s`) and appends the non-empty pieces to `out`.
void split_by(const nstring& s, const std::vector<span_match>& matches, split_behavior b, std::vector<nstring>& out);
/// Match lists: every character for which `pred` holds is one match.
template <typename Pred>
std::vector<span_match> char_matches(std::string_view s, Pred pred) {
  std::vector<span_match> m;
  size_t last = 0, i = 0;
  while (i < s.size()) {
    size_t len = 0;
    const char32_t c = utf8_at(s, i, len);
    if (pred(c)) {
      if (last < i) m.push_back({last, i, false});
      m.push_back({i, i + len, true});
      last = i + len;
    }
    i += len;
  }
  if (last < s.size()) m.push_back({last, s.size(), false});
  return m;
}
/// From a regex's matches (false when the engine gave up).
bool regex_matches(const regex& re, std::string_view s, std::vector<span_match>& out);

// ---------------------------------------------------------------------------------------------
// Pipeline components. `apply` returns a non-empty error only when the regex engine fails.

struct normalizer {
  virtual ~normalizer() = default;
  virtual caf::error apply(nstring& s) const = 0;
};
/// Null for JSON null.
std::unique_ptr<const normalizer> parse_normalizer(const json& j, const std::string& path);

struct pre_tokenizer {
  virtual ~pre_tokenizer() = default;
  /// Rewrites and splits `pieces` in place (empty pieces are dropped).
  virtual caf::error apply(std::vector<nstring>& pieces) const = 0;
};
std::unique_ptr<const pre_tokenizer> parse_pre_tokenizer(const json& j, const std::string& path);

struct decoder_step {
  virtual ~decoder_step() = default;
  virtual void apply(std::vector<std::string>& tokens) const = 0;
};
std::unique_ptr<const decoder_step> parse_decoder(const json& j, const std::string& path);

struct post_processor {
  virtual ~post_processor() = default;
  /// Adds the special tokens around one sequence's ids.
  virtual void apply(std::vector<int32_t>& ids) const = 0;
  /// How many ids `apply` adds to one sequence.
  [[nodiscard]] virtual size_t added() const = 0;
};
std::unique_ptr<const post_processor> parse_post_processor(const json& j, const std::string& path);

// ---------------------------------------------------------------------------------------------
// The BPE model

struct string_hash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
using vocab_map = std::unordered_map<std::string, int32_t, string_hash, std::equal_to<>>;

class bpe_model {
 public:
  /// Reads `j` (the "model" object, type BPE). Throws load_error.
  static std::unique_ptr<bpe_model> parse(const json& j, const std::string& path);

  /// Appends the ids of one pre-tokenized word. Results are cached per word.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  [[nodiscard]] std::optional<int32_t> token_to_id(std::string_view token) const;
  [[nodiscard]] const std::string* id_to_token(int32_t id) const;
  [[nodiscard]] int32_t size() const { return static_cast<int32_t>(id_to_token_.size()); }

 private:
  struct merge_info {
    uint32_t rank;
    int32_t new_id;
  };
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  void apply_merges(std::vector<int32_t>& ids) const;
  const merge_info* find_merge(int32_t a, int32_t b) const;

  vocab_map vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  std::unordered_map<uint64_t, merge_info> merges_;
  std::optional<int32_t> unk_id_;
  std::string prefix_;  ///< continuing_subword_prefix
  std::string suffix_;  ///< end_of_word_suffix
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  int32_t byte_ids_[256];  ///< <0xXX> tokens, -1 where absent

  static constexpr size_t cache_capacity = 10000;
  static constexpr size_t cache_max_word = 256;
  mutable std::shared_mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, string_hash, std::equal_to<>> cache_;
};

}  // namespace sy::model::tok
