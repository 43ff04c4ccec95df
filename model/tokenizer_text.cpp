// UTF-8 and Unicode helpers, the Oniguruma adapter, JSON accessors and splitting for the tokenizer.
#include "model/tokenizer_detail.hpp"

#include <oniguruma.h>
#include <utf8proc.h>

#include <algorithm>
#include <mutex>

namespace sy::model::tok {

// ---------------------------------------------------------------------------------------------
// UTF-8

size_t utf8_len(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

char32_t utf8_at(std::string_view s, size_t i, size_t& len) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  len = std::min(utf8_len(b(0)), s.size() - i);
  switch (len) {
    case 2: return (char32_t(b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return (char32_t(b(0) & 0x0F) << 12) | (char32_t(b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    case 4:
      return (char32_t(b(0) & 0x07) << 18) | (char32_t(b(1) & 0x3F) << 12) | (char32_t(b(2) & 0x3F) << 6) |
             (b(3) & 0x3F);
    default: return b(0);
  }
}

namespace {

/// Length of the valid sequence at s[i], or of its maximal invalid prefix (at least 1) with
/// `valid` false: the Unicode "maximal subpart" rule that Rust's from_utf8_lossy follows.
size_t utf8_scan(std::string_view s, size_t i, bool& valid) {
  const auto lead = static_cast<unsigned char>(s[i]);
  valid = true;
  if (lead < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the first continuation byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 1;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 2;
    if (lead == 0xE0) lo = 0xA0;
    if (lead == 0xED) hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 3;
    if (lead == 0xF0) lo = 0x90;
    if (lead == 0xF4) hi = 0x8F;
  } else {
    valid = false;
    return 1;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) {
      valid = false;
      return k;
    }
    const auto c = static_cast<unsigned char>(s[i + k]);
    const bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) {
      valid = false;
      return k;
    }
  }
  return need + 1;
}

}  // namespace

bool utf8_valid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    bool valid;
    i += utf8_scan(s, i, valid);
    if (!valid) return false;
  }
  return true;
}

void utf8_append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    bool valid;
    const size_t n = utf8_scan(bytes, i, valid);
    if (valid)
      out.append(bytes.substr(i, n));
    else
      out.append("\xEF\xBF\xBD");
    i += n;
  }
  return out;
}

bool ends_with_replacement_char(std::string_view s) {
  return s.size() >= 3 && s.substr(s.size() - 3) == "\xEF\xBF\xBD";
}

// ---------------------------------------------------------------------------------------------
// Unicode properties (utf8proc's tables)

bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_numeric(char32_t c) {
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool is_punctuation(char32_t c) {
  if (c < 0x80) return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat >= UTF8PROC_CATEGORY_PC && cat <= UTF8PROC_CATEGORY_PO;
}

bool is_word_char(char32_t c) {
  if (c == '_') return true;
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_MN && cat <= UTF8PROC_CATEGORY_ME) || cat == UTF8PROC_CATEGORY_ND ||
         cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_PC;
}

bool is_mark(char32_t c) {
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat >= UTF8PROC_CATEGORY_MN && cat <= UTF8PROC_CATEGORY_ME;
}

// ---------------------------------------------------------------------------------------------
// Regex

struct regex::compiled {
  regex_t* re = nullptr;
  ~compiled() {
    if (re) onig_free(re);
  }
};

namespace {
void onig_init_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    OnigEncoding encs[] = {ONIG_ENCODING_UTF8};
    onig_initialize(encs, 1);
  });
}

std::string onig_message(int code, OnigErrorInfo* info) {
  OnigUChar buf[ONIG_MAX_ERROR_MESSAGE_LEN];
  const int n = info ? onig_error_code_to_str(buf, code, info) : onig_error_code_to_str(buf, code);
  return std::string(reinterpret_cast<const char*>(buf), n > 0 ? static_cast<size_t>(n) : 0);
}
}  // namespace

std::optional<regex> regex::compile(std::string_view pattern, std::string& error) {
  onig_init_once();
  auto c = std::make_shared<compiled>();
  OnigErrorInfo info;
  const auto* p = reinterpret_cast<const OnigUChar*>(pattern.data());
  // Compiling touches Oniguruma's global tables; searches on compiled patterns are reentrant.
  static std::mutex compile_mu;
  std::lock_guard lock(compile_mu);
  const int r = onig_new(&c->re, p, p + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
  if (r != ONIG_NORMAL) {
    c->re = nullptr;
    error = onig_message(r, &info);
    return std::nullopt;
  }
  regex out;
  out.c_ = std::move(c);
  return out;
}

bool regex::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
  OnigRegion* region = onig_region_new();
  const auto* base = reinterpret_cast<const OnigUChar*>(text.data());
  const auto* end = base + text.size();
  size_t from = 0;
  std::optional<size_t> last_match_end;
  bool ok = true;
  while (from <= text.size()) {
    onig_region_clear(region);
    const int r = onig_search(c_->re, base, end, base + from, end, region, ONIG_OPTION_NONE);
    if (r == ONIG_MISMATCH) break;
    if (r < 0) {
      ok = false;
      break;
    }
    const auto s = static_cast<size_t>(region->beg[0]), e = static_cast<size_t>(region->end[0]);
    if (s == e && last_match_end == e) {
      // An empty match right where the previous one ended: step one character and search again.
      from += from < text.size() ? utf8_len(static_cast<unsigned char>(text[from])) : 1;
      continue;
    }
    out.emplace_back(s, e);
    from = e;
    last_match_end = e;
  }
  onig_region_free(region, 1);
  return ok;
}

bool regex::replace_all(std::string_view text, std::string_view with, std::string& out) const {
  std::vector<std::pair<size_t, size_t>> m;
  if (!find_all(text, m)) return false;
  out.clear();
  size_t last = 0;
  for (auto [b, e] : m) {
    out.append(text.substr(last, b - last));
    out.append(with);
    last = e;
  }
  out.append(text.substr(last));
  return true;
}

// ---------------------------------------------------------------------------------------------
// JSON accessors

void fail_at(model_errc code, const std::string& path, const std::string& what) {
  throw load_error{code, path + " " + what};
}

std::string quote(const std::string& s) { return json(s).dump(-1, ' ', false, json::error_handler_t::replace); }

const json* find_key(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

const json& require_key(const json& obj, const char* key, const std::string& path) {
  const json* v = find_key(obj, key);
  if (!v) fail_at(model_errc::missing_key, path + "." + key, "is missing");
  return *v;
}

std::string get_string(const json& obj, const char* key, const std::string& path) {
  const json& v = require_key(obj, key, path);
  if (!v.is_string()) fail_at(model_errc::bad_value, path + "." + key, "must be a string");
  return v.get<std::string>();
}

std::optional<std::string> get_opt_string(const json& obj, const char* key, const std::string& path) {
  const json* v = find_key(obj, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) fail_at(model_errc::bad_value, path + "." + key, "must be a string or null");
  return v->get<std::string>();
}

bool get_bool(const json& obj, const char* key, const std::string& path, bool fallback) {
  const json* v = find_key(obj, key);
  if (!v) return fallback;
  if (!v->is_boolean()) fail_at(model_errc::bad_value, path + "." + key, "must be true or false");
  return v->get<bool>();
}

int64_t get_int(const json& obj, const char* key, const std::string& path, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = find_key(obj, key);
  if (!v) return fallback;
  if (!v->is_number_integer()) fail_at(model_errc::bad_value, path + "." + key, "must be an integer");
  const int64_t x = v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v->get<int64_t>();
  if (x < lo || x > hi)
    fail_at(model_errc::bad_value, path + "." + key,
            "must be in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + std::to_string(x));
  return x;
}

char32_t get_char(const json& obj, const char* key, const std::string& path, char32_t fallback) {
  const json* v = find_key(obj, key);
  if (!v) return fallback;
  if (!v->is_string()) fail_at(model_errc::bad_value, path + "." + key, "must be a one-character string");
  const auto s = v->get<std::string>();
  size_t len = 0;
  const char32_t c = s.empty() || !utf8_valid(s) ? 0 : utf8_at(s, 0, len);
  if (s.empty() || len != s.size())
    fail_at(model_errc::bad_value, path + "." + key, "must be a one-character string, got " + quote(s));
  return c;
}

// ---------------------------------------------------------------------------------------------
// Aligned text and splitting

nstring nstring::slice(size_t begin, size_t end) const {
  nstring out;
  out.text = text.substr(begin, end - begin);
  out.orig.assign(orig.begin() + static_cast<std::ptrdiff_t>(begin), orig.begin() + static_cast<std::ptrdiff_t>(end));
  return out;
}

void nstring::append(std::string_view s, uint32_t at) {
  text.append(s);
  orig.insert(orig.end(), s.size(), at);
}

split_behavior parse_behavior(const json& obj, const char* key, const std::string& path, split_behavior fallback) {
  const json* v = find_key(obj, key);
  if (!v) return fallback;
  const std::string s = v->is_string() ? v->get<std::string>() : v->dump();
  if (s == "Removed") return split_behavior::removed;
  if (s == "Isolated") return split_behavior::isolated;
  if (s == "MergedWithPrevious") return split_behavior::merged_with_previous;
  if (s == "MergedWithNext") return split_behavior::merged_with_next;
  if (s == "Contiguous") return split_behavior::contiguous;
  fail_at(model_errc::bad_value, path + "." + key,
          quote(s) + " is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

void split_by(const nstring& s, const std::vector<span_match>& matches, split_behavior b, std::vector<nstring>& out) {
  struct span {
    size_t begin, end;
    bool drop;
  };
  std::vector<span> spans;
  spans.reserve(matches.size());
  bool prev_matched = false;
  switch (b) {
    case split_behavior::removed:
      for (const auto& m : matches) spans.push_back({m.begin, m.end, m.matched});
      break;
    case split_behavior::isolated:
      for (const auto& m : matches) spans.push_back({m.begin, m.end, false});
      break;
    case split_behavior::contiguous:
      for (const auto& m : matches) {
        if (m.matched == prev_matched && !spans.empty())
          spans.back().end = m.end;
        else
          spans.push_back({m.begin, m.end, false});
        prev_matched = m.matched;
      }
      break;
    case split_behavior::merged_with_previous:
      for (const auto& m : matches) {
        if (m.matched && !prev_matched && !spans.empty())
          spans.back().end = m.end;
        else
          spans.push_back({m.begin, m.end, false});
        prev_matched = m.matched;
      }
      break;
    case split_behavior::merged_with_next:
      for (auto it = matches.rbegin(); it != matches.rend(); ++it) {
        if (it->matched && !prev_matched && !spans.empty())
          spans.back().begin = it->begin;
        else
          spans.push_back({it->begin, it->end, false});
        prev_matched = it->matched;
      }
      std::reverse(spans.begin(), spans.end());
      break;
  }
  for (const auto& sp : spans)
    if (!sp.drop && sp.end > sp.begin) out.push_back(s.slice(sp.begin, sp.end));
}

bool regex_matches(const regex& re, std::string_view s, std::vector<span_match>& out) {
  std::vector<std::pair<size_t, size_t>> found;
  if (!re.find_all(s, found)) return false;
  out.clear();
  size_t prev = 0;
  for (auto [b, e] : found) {
    if (prev != b) out.push_back({prev, b, false});
    out.push_back({b, e, true});
    prev = e;
  }
  if (prev != s.size()) out.push_back({prev, s.size(), false});
  return true;
}

}  // namespace sy::model::tok
