#pragma once
/// Text ↔ token ids with a Hugging Face `tokenizers` tokenizer.json (and, beside it, the
/// tokenizer_config.json of `transformers`).
///
/// Supported: the BPE model (string or list merges, byte fallback, unk/fuse_unk, continuing-subword
/// prefix, end-of-word suffix, ignore_merges), the normalizers, pre-tokenizers, post-processors and
/// decoders that BPE checkpoints use (see docs/tokenizer.md for the list), and added tokens (special
/// or not, with lstrip/rstrip/single_word/normalized). Anything else in the file (a WordPiece or
/// Unigram model, an unknown component type) makes loading fail with a message naming the file and
/// the key; nothing is silently ignored.
///
/// Encoding and decoding are meant to give exactly the ids and text the `tokenizers` library gives
/// for the same file. A loaded tokenizer is immutable apart from an internal word cache: `encode`
/// and `decode` may be called from several threads at once.
#include "model/error.hpp"

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sy::model {

/// What we keep from tokenizer_config.json. Absent keys stay empty.
struct tokenizer_settings {
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<std::string> pad_token;
  std::optional<std::string> unk_token;
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  /// The Jinja chat template, stored verbatim (tokenizer_config.json's `chat_template`, its
  /// "default" entry when it is a list, or a chat_template.jinja file in the folder); empty if none.
  std::string chat_template;
  /// Absent when unset or when it is the "no limit" placeholder (1e30) `transformers` writes.
  std::optional<int64_t> model_max_length;
};

class tokenizer {
 public:
  /// Loads `path`: a folder holding tokenizer.json (and optionally tokenizer_config.json), or a
  /// tokenizer.json file (a tokenizer_config.json next to it is read too). Errors name the file
  /// and the key at fault, e.g. `…/tokenizer.json: model.type "WordPiece" is not supported`.
  [[nodiscard]] static caf::expected<tokenizer> load(const std::filesystem::path& path);

  /// Builds a tokenizer from the text of a tokenizer.json and, optionally, of a
  /// tokenizer_config.json (empty = none). `display_name` prefixes error messages.
  [[nodiscard]] static caf::expected<tokenizer> make(std::string_view tokenizer_json,
                                                     std::string_view config_json = {},
                                                     std::string display_name = "tokenizer.json");

  tokenizer(tokenizer&&) noexcept;
  tokenizer& operator=(tokenizer&&) noexcept;
  ~tokenizer();

  /// Token ids of `text` (UTF-8). With `add_special_tokens`, the post-processor's tokens (BOS …)
  /// are added, or, when tokenizer.json has no post-processor that adds any, the BOS/EOS that
  /// tokenizer_config.json's add_bos_token/add_eos_token ask for. Fails (invalid_argument) on
  /// invalid UTF-8, and when the regex engine gives up on a pathological input.
  [[nodiscard]] caf::expected<std::vector<int32_t>> encode(std::string_view text, bool add_special_tokens) const;

  /// The pieces the model is given for `text`, after added-token extraction, normalization and
  /// pre-tokenization (added tokens appear as the text they matched); for tests and tools.
  [[nodiscard]] caf::expected<std::vector<std::string>> pre_tokenize(std::string_view text) const;

  /// Text of `ids`. Ids the tokenizer does not know are skipped (as `tokenizers` does); with
  /// `skip_special_tokens`, added tokens marked special are too. Bytes that do not form valid
  /// UTF-8 come out as U+FFFD, so the result is always valid UTF-8.
  [[nodiscard]] std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  /// The id of a token's exact text (added tokens first, then the model's vocabulary).
  [[nodiscard]] std::optional<int32_t> token_to_id(std::string_view token) const;
  /// The text of one token as the vocabulary spells it (e.g. "Ġworld"), if the id exists.
  [[nodiscard]] std::optional<std::string> id_to_token(int32_t id) const;
  /// Whether `id` is an added token marked special.
  [[nodiscard]] bool is_special(int32_t id) const;
  /// One more than the largest id the tokenizer can produce.
  [[nodiscard]] int32_t vocab_size() const;

  [[nodiscard]] const tokenizer_settings& settings() const;
  /// Ids of tokenizer_config.json's bos_token / eos_token, when set and known.
  [[nodiscard]] std::optional<int32_t> bos_id() const;
  [[nodiscard]] std::optional<int32_t> eos_id() const;

  struct impl;

 private:
  explicit tokenizer(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

/// Streaming detokenization: fed one id at a time, returns the text those ids add, holding back
/// text until it no longer ends in an incomplete UTF-8 sequence (U+FFFD). Each piece is valid UTF-8
/// and never splits a character. The concatenation of every `push` and the final `finish` equals
/// `decode` of all ids, with one exception: where the ByteFallback decoder would turn an already
/// emitted character into U+FFFDs because later byte tokens made its run invalid UTF-8 (`decode`
/// of [<0xC3>, <0xA9>, <0xC3>] is three U+FFFD), the emitted "é" stands and only the dangling
/// byte becomes U+FFFD. Holds a reference to the tokenizer, which must outlive it.
class incremental_decoder {
 public:
  explicit incremental_decoder(const tokenizer& tok, bool skip_special_tokens = false);

  /// Adds `id`; returns the newly complete text (often empty).
  [[nodiscard]] std::string push(int32_t id);
  /// Returns whatever is still held back (an incomplete character comes out as U+FFFD); the
  /// decoder can then be fed again as if new.
  [[nodiscard]] std::string finish();

 private:
  [[nodiscard]] std::string fresh_text() const;

  const tokenizer* tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;  ///< ids from the start of the decoding window
  size_t read_ = 0;           ///< ids_[0, read_) have been emitted
};

}  // namespace sy::model
