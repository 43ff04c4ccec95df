#pragma once
/// Small helpers the fuzz targets share: a check that aborts with a message (libFuzzer reports the
/// abort as a crash and saves the input; the replay test fails), and a strict UTF-8 validator
/// independent of the project's own.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#define SY_FUZZ_CHECK(cond, ...)                                               \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: check failed: %s\n  ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
      std::abort();                                                            \
    }                                                                          \
  } while (0)

/// Sanitizer defaults built into every fuzz binary: UCX (linked by the transport) installs its own
/// SIGSEGV handler when it loads, which would hide AddressSanitizer's report of a bad access.
extern "C" const char* __asan_default_options() { return "allow_user_segv_handler=0"; }

namespace sy::fuzz {

/// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
inline bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;  // truncated sequence
    for (size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = cp << 6 | (d & 0x3F);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000)) return false;  // overlong
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

/// Reads little pieces of a fuzz input in order; past the end it yields zeros.
class byte_reader {
 public:
  byte_reader(const uint8_t* data, size_t size) : p_(data), n_(size) {}
  uint8_t u8() { return at_ < n_ ? p_[at_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | u8() << 8); }
  uint32_t u32() { return static_cast<uint32_t>(u16()) | static_cast<uint32_t>(u16()) << 16; }
  uint64_t u64() { return static_cast<uint64_t>(u32()) | static_cast<uint64_t>(u32()) << 32; }
  /// Up to `max` of the remaining bytes.
  std::string_view bytes(size_t max) {
    const size_t k = std::min(max, n_ - at_);
    std::string_view v(reinterpret_cast<const char*>(p_ + at_), k);
    at_ += k;
    return v;
  }
  std::string_view rest() { return bytes(n_ - at_); }
  [[nodiscard]] size_t left() const { return n_ - at_; }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t at_ = 0;
};

}  // namespace sy::fuzz
