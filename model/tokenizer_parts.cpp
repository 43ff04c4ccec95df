// The tokenizer pipeline's components: normalizers, pre-tokenizers, decoders, post-processors.
// Each follows the behaviour of the `tokenizers` component of the same name.
#include "model/tokenizer_detail.hpp"

#include <utf8proc.h>

#include <array>
#include <cstdlib>

namespace sy::model::tok {

namespace {

caf::error regex_failure() {
  return make_error(model_errc::invalid_argument, "tokenizer: the regex engine gave up on this input (retry or stack limit)");
}

std::string type_of(const json& j, const std::string& path) {
  if (!j.is_object()) fail_at(model_errc::bad_value, path, "must be an object or null");
  const json* t = find_key(j, "type");
  if (!t) fail_at(model_errc::missing_key, path + ".type", "is missing");
  if (!t->is_string()) fail_at(model_errc::bad_value, path + ".type", "must be a string");
  return t->get<std::string>();
}

[[noreturn]] void unsupported_type(const std::string& path, const std::string& type) {
  fail_at(model_errc::unsupported, path + ".type", quote(type) + " is not supported");
}

const json& require_array(const json& j, const char* key, const std::string& path) {
  const json& v = require_key(j, key, path);
  if (!v.is_array()) fail_at(model_errc::bad_value, path + "." + key, "must be a list");
  return v;
}

/// A Split/Replace pattern: {"String": "..."} (a literal) or {"Regex": "..."}.
struct text_pattern {
  std::string literal;
  std::optional<regex> re;

  static text_pattern parse(const json& j, const char* key, const std::string& path) {
    const json& p = require_key(j, key, path);
    const std::string where = path + "." + key;
    if (!p.is_object() || p.size() != 1) fail_at(model_errc::bad_value, where, "must be {\"String\": …} or {\"Regex\": …}");
    text_pattern out;
    if (const json* s = find_key(p, "String")) {
      if (!s->is_string()) fail_at(model_errc::bad_value, where + ".String", "must be a string");
      out.literal = s->get<std::string>();
      if (out.literal.empty()) fail_at(model_errc::bad_value, where + ".String", "must not be empty");
    } else if (const json* r = find_key(p, "Regex")) {
      if (!r->is_string()) fail_at(model_errc::bad_value, where + ".Regex", "must be a string");
      std::string err;
      out.re = regex::compile(r->get<std::string>(), err);
      if (!out.re) fail_at(model_errc::bad_value, where + ".Regex", quote(r->get<std::string>()) + " does not compile: " + err);
    } else {
      fail_at(model_errc::unsupported, where, p.begin().key() + " patterns are not supported (String or Regex)");
    }
    return out;
  }

  bool matches(std::string_view s, std::vector<span_match>& out) const {
    if (re) return regex_matches(*re, s, out);
    out.clear();
    size_t prev = 0;
    for (size_t at = s.find(literal); at != std::string_view::npos; at = s.find(literal, at + literal.size())) {
      if (prev != at) out.push_back({prev, at, false});
      out.push_back({at, at + literal.size(), true});
      prev = at + literal.size();
    }
    if (prev != s.size()) out.push_back({prev, s.size(), false});
    return true;
  }
};

// The GPT-2 byte ↔ character table: printable Latin-1 bytes map to themselves, the others to
// U+0100 onwards in byte order.
struct byte_table {
  std::array<std::string, 256> to_char;
  std::unordered_map<char32_t, unsigned char> to_byte;
  byte_table() {
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t c = printable ? b : next++;
      utf8_append(to_char[b], c);
      to_byte[c] = static_cast<unsigned char>(b);
    }
  }
};
const byte_table& bytes() {
  static const byte_table t;
  return t;
}

/// Rewrites each byte of `s` as its byte-level character.
void byte_level_map(nstring& s) {
  nstring out;
  out.text.reserve(s.text.size() * 2);
  out.orig.reserve(s.text.size() * 2);
  for (size_t i = 0; i < s.text.size(); ++i) out.append(bytes().to_char[static_cast<unsigned char>(s.text[i])], s.orig[i]);
  s = std::move(out);
}

/// Prepends `p`, aligned to the first character.
void prepend(nstring& s, std::string_view p) {
  const uint32_t at = s.orig.empty() ? 0 : s.orig.front();
  s.text.insert(0, p);
  s.orig.insert(s.orig.begin(), p.size(), at);
}

// ---------------------------------------------------------------------------------------------
// Normalizers

struct sequence_normalizer final : normalizer {
  std::vector<std::unique_ptr<const normalizer>> parts;
  caf::error apply(nstring& s) const override {
    for (const auto& p : parts)
      if (auto e = p->apply(s)) return e;
    return {};
  }
};

struct prepend_normalizer final : normalizer {
  std::string text;
  caf::error apply(nstring& s) const override {
    if (!s.text.empty()) prepend(s, text);
    return {};
  }
};

struct append_normalizer final : normalizer {
  std::string text;
  caf::error apply(nstring& s) const override {
    if (!s.text.empty()) s.append(text, s.orig.back());
    return {};
  }
};

struct replace_normalizer final : normalizer {
  text_pattern pattern;
  std::string content;
  caf::error apply(nstring& s) const override {
    std::vector<span_match> m;
    if (!pattern.matches(s.text, m)) return regex_failure();
    nstring out;
    for (const auto& x : m) {
      if (!x.matched) {
        out.text.append(s.text, x.begin, x.end - x.begin);
        out.orig.insert(out.orig.end(), s.orig.begin() + static_cast<std::ptrdiff_t>(x.begin),
                        s.orig.begin() + static_cast<std::ptrdiff_t>(x.end));
      } else if (!s.orig.empty()) {
        out.append(content, s.orig[std::min(x.begin, s.orig.size() - 1)]);
      }
    }
    s = std::move(out);
    return {};
  }
};

std::string utf8proc_apply(std::string_view in, int options) {
  utf8proc_uint8_t* dst = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(in.data()), static_cast<utf8proc_ssize_t>(in.size()), &dst,
                              static_cast<utf8proc_option_t>(options));
  if (n < 0) return std::string(in);  // input is validated UTF-8 beforehand; keep it unchanged if not
  std::string out(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
  std::free(dst);
  return out;
}

struct unicode_normalizer final : normalizer {
  int options;
  explicit unicode_normalizer(int o) : options(o | UTF8PROC_STABLE) {}
  caf::error apply(nstring& s) const override {
    bool ascii = true;
    for (char c : s.text) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
    if (ascii) return {};
    std::string whole = utf8proc_apply(s.text, options);
    if (whole == s.text) return {};
    // Normalize chunk by chunk (a starter and the marks after it) to keep each output byte aligned
    // to the input character it came from; if chunking changes the result (compositions across
    // starters), keep the whole-text result with an approximate alignment.
    nstring out;
    size_t chunk = 0, i = 0;
    auto flush = [&](size_t end) {
      if (end > chunk) out.append(utf8proc_apply(std::string_view(s.text).substr(chunk, end - chunk), options), s.orig[chunk]);
      chunk = end;
    };
    while (i < s.text.size()) {
      size_t len = 0;
      const char32_t c = utf8_at(s.text, i, len);
      const auto* prop = utf8proc_get_property(static_cast<utf8proc_int32_t>(c));
      const bool hangul_jamo_vt = (c >= 0x1160 && c <= 0x11FF) || (c >= 0xD7B0 && c <= 0xD7FF);
      if (i > 0 && prop->combining_class == 0 && !hangul_jamo_vt) flush(i);
      i += len;
    }
    flush(s.text.size());
    if (out.text != whole) {
      out.text = std::move(whole);
      out.orig.assign(out.text.size(), 0);
      for (size_t k = 0; k < out.text.size(); ++k) out.orig[k] = s.orig[std::min(k * s.text.size() / out.text.size(), s.text.size() - 1)];
    }
    s = std::move(out);
    return {};
  }
};

struct lowercase_normalizer final : normalizer {
  caf::error apply(nstring& s) const override {
    nstring out;
    out.text.reserve(s.text.size());
    for (size_t i = 0; i < s.text.size();) {
      size_t len = 0;
      const char32_t c = utf8_at(s.text, i, len);
      std::string buf;
      if (c == 0x130) {  // the one code point whose full lowercase mapping is two characters
        buf = "i\xCC\x87";
      } else {
        utf8_append(buf, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
      }
      out.append(buf, s.orig[i]);
      i += len;
    }
    s = std::move(out);
    return {};
  }
};

struct strip_normalizer final : normalizer {
  bool left = true, right = true;
  caf::error apply(nstring& s) const override {
    size_t b = 0, e = s.text.size();
    if (left)
      while (b < e) {
        size_t len = 0;
        if (!is_whitespace(utf8_at(s.text, b, len))) break;
        b += len;
      }
    if (right)
      while (e > b) {
        size_t start = e - 1;
        while (start > b && (static_cast<unsigned char>(s.text[start]) & 0xC0) == 0x80) --start;
        size_t len = 0;
        if (!is_whitespace(utf8_at(s.text, start, len))) break;
        e = start;
      }
    s = s.slice(b, e);
    return {};
  }
};

struct strip_accents_normalizer final : normalizer {
  caf::error apply(nstring& s) const override {
    nstring out;
    for (size_t i = 0; i < s.text.size();) {
      size_t len = 0;
      const char32_t c = utf8_at(s.text, i, len);
      if (!is_mark(c)) out.append(std::string_view(s.text).substr(i, len), s.orig[i]);
      i += len;
    }
    s = std::move(out);
    return {};
  }
};

struct byte_level_normalizer final : normalizer {
  caf::error apply(nstring& s) const override {
    byte_level_map(s);
    return {};
  }
};

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

/// A pre-tokenizer that splits each piece by a match list, without rewriting it.
template <typename MatchFn>
caf::error split_each(std::vector<nstring>& pieces, split_behavior b, MatchFn&& fn) {
  std::vector<nstring> out;
  out.reserve(pieces.size());
  std::vector<span_match> m;
  for (const auto& p : pieces) {
    if (!fn(p.text, m)) return regex_failure();
    split_by(p, m, b, out);
  }
  pieces = std::move(out);
  return {};
}

void invert(std::vector<span_match>& m) {
  for (auto& x : m) x.matched = !x.matched;
}

struct sequence_pre_tokenizer final : pre_tokenizer {
  std::vector<std::unique_ptr<const pre_tokenizer>> parts;
  caf::error apply(std::vector<nstring>& pieces) const override {
    for (const auto& p : parts)
      if (auto e = p->apply(pieces)) return e;
    return {};
  }
};

struct split_pre_tokenizer final : pre_tokenizer {
  text_pattern pattern;
  split_behavior behavior = split_behavior::isolated;
  bool inverted = false;
  caf::error apply(std::vector<nstring>& pieces) const override {
    return split_each(pieces, behavior, [&](std::string_view s, std::vector<span_match>& m) {
      if (!pattern.matches(s, m)) return false;
      if (inverted) invert(m);
      return true;
    });
  }
};

const char* const gpt2_pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const whitespace_pattern = R"(\w+|[^\w\s]+)";

const regex& compiled_regex(const char* pattern) {
  // Only ever called with the two built-in patterns below; both compile.
  static std::mutex mu;
  static std::unordered_map<const char*, regex> cache;
  std::lock_guard lock(mu);
  auto it = cache.find(pattern);
  if (it == cache.end()) {
    std::string err;
    it = cache.emplace(pattern, *regex::compile(pattern, err)).first;
  }
  return it->second;
}

struct byte_level_pre_tokenizer final : pre_tokenizer {
  bool add_prefix_space = true;
  bool use_regex = true;
  const regex* re = nullptr;
  caf::error apply(std::vector<nstring>& pieces) const override {
    if (add_prefix_space)
      for (auto& p : pieces)
        if (p.text.empty() || p.text[0] != ' ') prepend(p, " ");
    if (use_regex)
      if (auto e = split_each(pieces, split_behavior::isolated, [&](std::string_view s, std::vector<span_match>& m) { return regex_matches(*re, s, m); }))
        return e;
    for (auto& p : pieces) byte_level_map(p);
    return {};
  }
};

enum class prepend_scheme { always, first, never };

prepend_scheme parse_prepend_scheme(const json& j, const std::string& path) {
  if (const json* v = find_key(j, "prepend_scheme")) {
    const std::string s = v->is_string() ? v->get<std::string>() : v->dump();
    if (s == "always") return prepend_scheme::always;
    if (s == "first") return prepend_scheme::first;
    if (s == "never") return prepend_scheme::never;
    fail_at(model_errc::bad_value, path + ".prepend_scheme", quote(s) + " is not one of always, first, never");
  }
  return get_bool(j, "add_prefix_space", path, true) ? prepend_scheme::always : prepend_scheme::never;
}

struct metaspace_pre_tokenizer final : pre_tokenizer {
  char32_t replacement = U'\u2581';
  std::string rep;
  prepend_scheme scheme = prepend_scheme::always;
  bool split = true;
  caf::error apply(std::vector<nstring>& pieces) const override {
    for (auto& p : pieces) {
      nstring out;
      out.text.reserve(p.text.size() + 3);
      for (size_t i = 0; i < p.text.size(); ++i) {
        if (p.text[i] == ' ')
          out.append(rep, p.orig[i]);
        else
          out.append(std::string_view(p.text).substr(i, 1), p.orig[i]);
      }
      const bool starts = out.text.compare(0, rep.size(), rep) == 0;
      const bool at_start = !p.orig.empty() && p.orig.front() == 0;
      if (!starts && (scheme == prepend_scheme::always || (scheme == prepend_scheme::first && at_start))) prepend(out, rep);
      p = std::move(out);
    }
    if (!split) return {};
    return split_each(pieces, split_behavior::merged_with_next, [&](std::string_view s, std::vector<span_match>& m) {
      m = char_matches(s, [&](char32_t c) { return c == replacement; });
      return true;
    });
  }
};

struct char_split_pre_tokenizer final : pre_tokenizer {
  enum class kind { digits, punctuation, whitespace_split, delimiter } what;
  split_behavior behavior;
  char32_t delimiter = 0;
  caf::error apply(std::vector<nstring>& pieces) const override {
    return split_each(pieces, behavior, [&](std::string_view s, std::vector<span_match>& m) {
      switch (what) {
        case kind::digits: m = char_matches(s, is_numeric); break;
        case kind::punctuation: m = char_matches(s, is_punctuation); break;
        case kind::whitespace_split: m = char_matches(s, is_whitespace); break;
        case kind::delimiter: m = char_matches(s, [&](char32_t c) { return c == delimiter; }); break;
      }
      return true;
    });
  }
};

struct whitespace_pre_tokenizer final : pre_tokenizer {
  const regex* re = nullptr;
  caf::error apply(std::vector<nstring>& pieces) const override {
    return split_each(pieces, split_behavior::removed, [&](std::string_view s, std::vector<span_match>& m) {
      if (!regex_matches(*re, s, m)) return false;
      invert(m);
      return true;
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Decoders

struct sequence_decoder final : decoder_step {
  std::vector<std::unique_ptr<const decoder_step>> parts;
  void apply(std::vector<std::string>& t) const override {
    for (const auto& p : parts) p->apply(t);
  }
};

struct byte_level_decoder final : decoder_step {
  void apply(std::vector<std::string>& t) const override {
    std::string raw;
    const auto& table = bytes().to_byte;
    for (const auto& tok : t) {
      const size_t mark = raw.size();
      bool all = true;
      for (size_t i = 0; i < tok.size() && all;) {
        size_t len = 0;
        auto it = table.find(utf8_at(tok, i, len));
        if (it == table.end())
          all = false;
        else
          raw.push_back(static_cast<char>(it->second));
        i += len;
      }
      // A token with characters outside the table (an added token such as "<｜begin▁of▁sentence｜>")
      // stands for its own UTF-8 bytes.
      if (!all) raw.resize(mark), raw.append(tok);
    }
    t.assign(1, utf8_lossy(raw));
  }
};

struct replace_decoder final : decoder_step {
  text_pattern pattern;
  std::string content;
  void apply(std::vector<std::string>& t) const override {
    std::vector<span_match> m;
    for (auto& tok : t) {
      // A regex that gives up leaves the token as it was; decoding has no error path.
      if (!pattern.matches(tok, m)) continue;
      std::string out;
      for (const auto& x : m) out.append(x.matched ? std::string_view(content) : std::string_view(tok).substr(x.begin, x.end - x.begin));
      tok = std::move(out);
    }
  }
};

struct byte_fallback_decoder final : decoder_step {
  static std::optional<unsigned char> byte_of(const std::string& tok) {
    if (tok.size() != 6 || tok.compare(0, 3, "<0x") != 0 || tok[5] != '>') return std::nullopt;
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      return -1;
    };
    const int hi = hex(tok[3]), lo = hex(tok[4]);
    if (hi < 0 || lo < 0) return std::nullopt;
    return static_cast<unsigned char>(hi * 16 + lo);
  }
  void apply(std::vector<std::string>& t) const override {
    std::vector<std::string> out;
    out.reserve(t.size());
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (utf8_valid(pending))
        out.push_back(pending);
      else
        for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      pending.clear();
    };
    for (auto& tok : t) {
      if (auto b = byte_of(tok)) {
        pending.push_back(static_cast<char>(*b));
      } else {
        flush();
        out.push_back(std::move(tok));
      }
    }
    flush();
    t = std::move(out);
  }
};

struct fuse_decoder final : decoder_step {
  void apply(std::vector<std::string>& t) const override {
    std::string all;
    for (const auto& tok : t) all += tok;
    t.assign(1, std::move(all));
  }
};

struct strip_decoder final : decoder_step {
  char32_t content = ' ';
  size_t start = 0, stop = 0;
  void apply(std::vector<std::string>& t) const override {
    for (auto& tok : t) {
      std::vector<std::pair<size_t, char32_t>> chars;  // byte offset, code point
      for (size_t i = 0; i < tok.size();) {
        size_t len = 0;
        chars.emplace_back(i, utf8_at(tok, i, len));
        i += len;
      }
      auto is_content = [&](size_t k) { return chars[k].second == content; };
      size_t b = 0, e = chars.size();
      for (size_t k = 0; k < start && b < chars.size() && is_content(b); ++k) ++b;
      for (size_t k = 0; k < stop && e > b && is_content(e - 1); ++k) --e;
      const size_t from = b < chars.size() ? chars[b].first : tok.size();
      const size_t to = e < chars.size() ? chars[e].first : tok.size();
      tok = tok.substr(from, to > from ? to - from : 0);
    }
  }
};

struct metaspace_decoder final : decoder_step {
  char32_t replacement = U'\u2581';
  std::string rep;
  prepend_scheme scheme = prepend_scheme::always;
  void apply(std::vector<std::string>& t) const override {
    for (size_t i = 0; i < t.size(); ++i) {
      std::string out;
      const std::string& tok = t[i];
      for (size_t at = 0; at < tok.size();) {
        if (tok.compare(at, rep.size(), rep) == 0) {
          // `tokenizers` drops every replacement character of the first token when it prepends.
          if (!(i == 0 && scheme != prepend_scheme::never)) out.push_back(' ');
          at += rep.size();
        } else {
          out.push_back(tok[at++]);
        }
      }
      t[i] = std::move(out);
    }
  }
};

struct bpe_decoder final : decoder_step {
  std::string suffix;
  void apply(std::vector<std::string>& t) const override {
    for (size_t i = 0; i < t.size(); ++i) {
      std::string out;
      const std::string with = i + 1 == t.size() ? "" : " ";
      const std::string& tok = t[i];
      size_t last = 0;
      for (size_t at = tok.find(suffix); !suffix.empty() && at != std::string::npos; at = tok.find(suffix, last)) {
        out.append(tok, last, at - last);
        out.append(with);
        last = at + suffix.size();
      }
      out.append(tok, last);
      t[i] = std::move(out);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Post-processors

struct template_post_processor final : post_processor {
  std::vector<int32_t> before, after;
  void apply(std::vector<int32_t>& ids) const override {
    ids.insert(ids.begin(), before.begin(), before.end());
    ids.insert(ids.end(), after.begin(), after.end());
  }
  size_t added() const override { return before.size() + after.size(); }
};

struct sequence_post_processor final : post_processor {
  std::vector<std::unique_ptr<const post_processor>> parts;
  void apply(std::vector<int32_t>& ids) const override {
    for (const auto& p : parts) p->apply(ids);
  }
  size_t added() const override {
    size_t n = 0;
    for (const auto& p : parts) n += p->added();
    return n;
  }
};

int32_t read_id(const json& v, const std::string& path) {
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
    fail_at(model_errc::bad_value, path, "must be a token id (a non-negative integer)");
  return static_cast<int32_t>(v.get<int64_t>());
}

/// RobertaProcessing/BertProcessing's ["<s>", 0] pairs.
int32_t token_pair_id(const json& j, const char* key, const std::string& path) {
  const json& v = require_key(j, key, path);
  if (!v.is_array() || v.size() != 2) fail_at(model_errc::bad_value, path + "." + key, "must be [token, id]");
  return read_id(v[1], path + "." + key + "[1]");
}

std::unique_ptr<const post_processor> parse_template(const json& j, const std::string& path) {
  const json& single = require_array(j, "single", path);
  const json* specials = find_key(j, "special_tokens");
  auto out = std::make_unique<template_post_processor>();
  bool seen_sequence = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const std::string where = path + ".single[" + std::to_string(i) + "]";
    const json& piece = single[i];
    if (find_key(piece, "Sequence")) {
      if (seen_sequence) fail_at(model_errc::unsupported, where, "a second sequence in the single template is not supported");
      seen_sequence = true;
      continue;
    }
    const json* sp = find_key(piece, "SpecialToken");
    if (!sp) fail_at(model_errc::bad_value, where, "must be {\"Sequence\": …} or {\"SpecialToken\": …}");
    const std::string name = get_string(*sp, "id", where + ".SpecialToken");
    const json* tok = specials ? find_key(*specials, name.c_str()) : nullptr;
    if (!tok) fail_at(model_errc::missing_key, path + ".special_tokens", "has no entry " + quote(name) + " (used by " + where + ")");
    const std::string tpath = path + ".special_tokens." + name;
    const json& ids = require_array(*tok, "ids", tpath);
    for (size_t k = 0; k < ids.size(); ++k)
      (seen_sequence ? out->after : out->before).push_back(read_id(ids[k], tpath + ".ids[" + std::to_string(k) + "]"));
  }
  if (!seen_sequence) fail_at(model_errc::bad_value, path + ".single", "has no {\"Sequence\": …} entry");
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Parsers

std::unique_ptr<const normalizer> parse_normalizer(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, path);
  if (type == "Sequence") {
    auto s = std::make_unique<sequence_normalizer>();
    const json& list = require_array(j, "normalizers", path);
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = parse_normalizer(list[i], path + ".normalizers[" + std::to_string(i) + "]")) s->parts.push_back(std::move(p));
    return s;
  }
  if (type == "Prepend") {
    auto p = std::make_unique<prepend_normalizer>();
    p->text = get_string(j, "prepend", path);
    return p;
  }
  if (type == "Append") {
    auto p = std::make_unique<append_normalizer>();
    p->text = get_string(j, "append", path);
    return p;
  }
  if (type == "Replace") {
    auto p = std::make_unique<replace_normalizer>();
    p->pattern = text_pattern::parse(j, "pattern", path);
    p->content = get_string(j, "content", path);
    return p;
  }
  if (type == "NFC") return std::make_unique<unicode_normalizer>(UTF8PROC_COMPOSE);
  if (type == "NFD") return std::make_unique<unicode_normalizer>(UTF8PROC_DECOMPOSE);
  if (type == "NFKC") return std::make_unique<unicode_normalizer>(UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  if (type == "NFKD") return std::make_unique<unicode_normalizer>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  if (type == "Lowercase") return std::make_unique<lowercase_normalizer>();
  if (type == "Strip") {
    auto p = std::make_unique<strip_normalizer>();
    p->left = get_bool(j, "strip_left", path, true);
    p->right = get_bool(j, "strip_right", path, true);
    return p;
  }
  if (type == "StripAccents") return std::make_unique<strip_accents_normalizer>();
  if (type == "ByteLevel") return std::make_unique<byte_level_normalizer>();
  unsupported_type(path, type);
}

std::unique_ptr<const pre_tokenizer> parse_pre_tokenizer(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, path);
  if (type == "Sequence") {
    auto s = std::make_unique<sequence_pre_tokenizer>();
    const json& list = require_array(j, "pretokenizers", path);
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = parse_pre_tokenizer(list[i], path + ".pretokenizers[" + std::to_string(i) + "]")) s->parts.push_back(std::move(p));
    return s;
  }
  if (type == "Split") {
    auto p = std::make_unique<split_pre_tokenizer>();
    p->pattern = text_pattern::parse(j, "pattern", path);
    p->behavior = parse_behavior(j, "behavior", path, split_behavior::isolated);
    if (!find_key(j, "behavior")) fail_at(model_errc::missing_key, path + ".behavior", "is missing");
    p->inverted = get_bool(j, "invert", path, false);
    return p;
  }
  if (type == "ByteLevel") {
    auto p = std::make_unique<byte_level_pre_tokenizer>();
    p->add_prefix_space = get_bool(j, "add_prefix_space", path, true);
    p->use_regex = get_bool(j, "use_regex", path, true);
    p->re = &compiled_regex(gpt2_pattern);
    return p;
  }
  if (type == "Metaspace") {
    auto p = std::make_unique<metaspace_pre_tokenizer>();
    p->replacement = get_char(j, "replacement", path, U'\u2581');
    utf8_append(p->rep, p->replacement);
    p->scheme = parse_prepend_scheme(j, path);
    p->split = get_bool(j, "split", path, true);
    return p;
  }
  if (type == "Digits") {
    auto p = std::make_unique<char_split_pre_tokenizer>();
    p->what = char_split_pre_tokenizer::kind::digits;
    p->behavior = get_bool(j, "individual_digits", path, false) ? split_behavior::isolated : split_behavior::contiguous;
    return p;
  }
  if (type == "Punctuation") {
    auto p = std::make_unique<char_split_pre_tokenizer>();
    p->what = char_split_pre_tokenizer::kind::punctuation;
    p->behavior = parse_behavior(j, "behavior", path, split_behavior::isolated);
    return p;
  }
  if (type == "WhitespaceSplit") {
    auto p = std::make_unique<char_split_pre_tokenizer>();
    p->what = char_split_pre_tokenizer::kind::whitespace_split;
    p->behavior = split_behavior::removed;
    return p;
  }
  if (type == "CharDelimiterSplit") {
    auto p = std::make_unique<char_split_pre_tokenizer>();
    p->what = char_split_pre_tokenizer::kind::delimiter;
    p->behavior = split_behavior::removed;
    p->delimiter = get_char(j, "delimiter", path, 0);
    if (!find_key(j, "delimiter")) fail_at(model_errc::missing_key, path + ".delimiter", "is missing");
    return p;
  }
  if (type == "Whitespace") {
    auto p = std::make_unique<whitespace_pre_tokenizer>();
    p->re = &compiled_regex(whitespace_pattern);
    return p;
  }
  if (type == "BertPreTokenizer") {
    auto s = std::make_unique<sequence_pre_tokenizer>();
    auto ws = std::make_unique<char_split_pre_tokenizer>();
    ws->what = char_split_pre_tokenizer::kind::whitespace_split;
    ws->behavior = split_behavior::removed;
    auto punct = std::make_unique<char_split_pre_tokenizer>();
    punct->what = char_split_pre_tokenizer::kind::punctuation;
    punct->behavior = split_behavior::isolated;
    s->parts.push_back(std::move(ws));
    s->parts.push_back(std::move(punct));
    return s;
  }
  unsupported_type(path, type);
}

std::unique_ptr<const decoder_step> parse_decoder(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, path);
  if (type == "Sequence") {
    auto s = std::make_unique<sequence_decoder>();
    const json& list = require_array(j, "decoders", path);
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = parse_decoder(list[i], path + ".decoders[" + std::to_string(i) + "]")) s->parts.push_back(std::move(p));
    return s;
  }
  if (type == "ByteLevel") return std::make_unique<byte_level_decoder>();
  if (type == "Replace") {
    auto p = std::make_unique<replace_decoder>();
    p->pattern = text_pattern::parse(j, "pattern", path);
    p->content = get_string(j, "content", path);
    return p;
  }
  if (type == "ByteFallback") return std::make_unique<byte_fallback_decoder>();
  if (type == "Fuse") return std::make_unique<fuse_decoder>();
  if (type == "Strip") {
    auto p = std::make_unique<strip_decoder>();
    p->content = get_char(j, "content", path, ' ');
    p->start = static_cast<size_t>(get_int(j, "start", path, 0, 0, INT32_MAX));
    p->stop = static_cast<size_t>(get_int(j, "stop", path, 0, 0, INT32_MAX));
    return p;
  }
  if (type == "Metaspace") {
    auto p = std::make_unique<metaspace_decoder>();
    p->replacement = get_char(j, "replacement", path, U'\u2581');
    utf8_append(p->rep, p->replacement);
    p->scheme = parse_prepend_scheme(j, path);
    return p;
  }
  if (type == "BPEDecoder") {
    auto p = std::make_unique<bpe_decoder>();
    p->suffix = find_key(j, "suffix") ? get_string(j, "suffix", path) : "</w>";
    return p;
  }
  unsupported_type(path, type);
}

std::unique_ptr<const post_processor> parse_post_processor(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, path);
  if (type == "Sequence") {
    auto s = std::make_unique<sequence_post_processor>();
    const json& list = require_array(j, "processors", path);
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = parse_post_processor(list[i], path + ".processors[" + std::to_string(i) + "]")) s->parts.push_back(std::move(p));
    return s;
  }
  if (type == "TemplateProcessing") return parse_template(j, path);
  if (type == "ByteLevel") return std::make_unique<sequence_post_processor>();  // offsets only; ids unchanged
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto p = std::make_unique<template_post_processor>();
    p->before.push_back(token_pair_id(j, "cls", path));
    p->after.push_back(token_pair_id(j, "sep", path));
    return p;
  }
  unsupported_type(path, type);
}

}  // namespace sy::model::tok
