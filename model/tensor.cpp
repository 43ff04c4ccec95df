#include "model/tensor.hpp"

#include <cmath>
#include <cstdlib>
#include <new>
#include <stdexcept>

namespace sy::model {

size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f64:
    case dtype::i64: return 8;
    case dtype::f32:
    case dtype::i32: return 4;
    case dtype::bf16:
    case dtype::f16:
    case dtype::i16: return 2;
    case dtype::i8:
    case dtype::u8:
    case dtype::f8_e4m3:
    case dtype::boolean: return 1;
  }
  return 0;
}

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::bf16: return "BF16";
    case dtype::f16: return "F16";
    case dtype::f64: return "F64";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::i16: return "I16";
    case dtype::i8: return "I8";
    case dtype::u8: return "U8";
    case dtype::f8_e4m3: return "F8_E4M3";
    case dtype::boolean: return "BOOL";
  }
  return "?";
}

std::optional<dtype> dtype_from_name(std::string_view n) {
  for (auto t : {dtype::f32, dtype::bf16, dtype::f16, dtype::f64, dtype::i64, dtype::i32, dtype::i16,
                 dtype::i8, dtype::u8, dtype::f8_e4m3, dtype::boolean})
    if (n == dtype_name(t)) return t;
  return std::nullopt;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow → inf
  if (absx < 0x38800000u) {                                                // subnormal or zero
    float a;
    std::memcpy(&a, &absx, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t mant_odd = (absx >> 13) & 1u;
  absx += 0xc8000fffu + mant_odd;  // rebias exponent and round to nearest even
  return static_cast<uint16_t>(sign | (absx >> 13));
}

float f8e4m3_to_f32(uint8_t v) {
  // OCP e4m3fn: bias 7, no infinities, 0x7f/0xff are NaN.
  uint32_t sign = v >> 7;
  uint32_t exp = (v >> 3) & 0xf;
  uint32_t man = v & 0x7;
  float out;
  if (exp == 0xf && man == 0x7) {
    out = std::nanf("");
  } else if (exp == 0) {
    out = std::ldexp(static_cast<float>(man), -9);
  } else {
    out = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, static_cast<int>(exp) - 7);
  }
  return sign ? -out : out;
}

uint8_t f32_to_f8e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate to the largest finite value
  if (a < 0.015625f) {                 // below 2^-6: subnormals, steps of 2^-9
    const int m = static_cast<int>(std::nearbyint(a * 512.0f));  // ties to even
    return sign | static_cast<uint8_t>(m);                      // m == 8 is exactly the code of 2^-6
  }
  int ex;
  const float fr = std::frexp(a, &ex);  // a = fr · 2^ex, fr in [0.5, 1)
  int e = ex - 1;
  int m = static_cast<int>(std::nearbyint((fr * 2.0f - 1.0f) * 8.0f));
  if (m == 8) {
    m = 0;
    ++e;
  }
  if (e > 8 || (e == 8 && m == 7)) return sign | 0x7e;
  return sign | static_cast<uint8_t>(((e + 7) << 3) | m);
}

bool convert_to_f32(dtype t, const void* src, float* dst, size_t n) {
  switch (t) {
    case dtype::f32: std::memcpy(dst, src, n * 4); return true;
    case dtype::bf16: {
      auto s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return true;
    }
    case dtype::f16: {
      auto s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return true;
    }
    case dtype::f64: {
      auto s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return true;
    }
    case dtype::f8_e4m3: {
      auto s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8e4m3_to_f32(s[i]);
      return true;
    }
    default: return false;
  }
}

aligned_buffer::aligned_buffer(size_t bytes) : size_(bytes) {
  size_t rounded = (bytes + 63) / 64 * 64;
  if (rounded == 0) rounded = 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw std::bad_alloc();
  ptr_.reset(static_cast<std::byte*>(p));
}

void aligned_buffer::deleter::operator()(std::byte* p) const { std::free(p); }

matrix::matrix(dtype type, int64_t rows, int64_t cols)
    : type_(type), rows_(rows), cols_(cols), buf_(static_cast<size_t>(rows * cols) * dtype_size(type)) {}

matrix matrix::from(dtype storage, dtype src_type, const void* src, int64_t rows, int64_t cols) {
  matrix m(storage, rows, cols);
  size_t n = static_cast<size_t>(rows * cols);
  if (storage == src_type) {
    std::memcpy(m.raw(), src, n * dtype_size(storage));
    return m;
  }
  if (storage == dtype::f32) {
    convert_to_f32(src_type, src, m.f32(), n);
    return m;
  }
  // storage bf16 from another float type: go through f32 in blocks
  constexpr size_t block = 4096;
  float tmp[block];
  auto* out = m.bf16();
  auto* bytes = static_cast<const std::byte*>(src);
  for (size_t i = 0; i < n; i += block) {
    size_t k = std::min(block, n - i);
    convert_to_f32(src_type, bytes + i * dtype_size(src_type), tmp, k);
    for (size_t j = 0; j < k; ++j) out[i + j] = f32_to_bf16(tmp[j]);
  }
  return m;
}

matrix matrix::from_f32(dtype storage, std::span<const float> src, int64_t rows, int64_t cols) {
  return from(storage, dtype::f32, src.data(), rows, cols);
}

matrix matrix::packed_from(const matrix& m) {
  const int64_t w = pack_width, blocks = (m.rows() + w - 1) / w, k = m.cols();
  matrix p;
  p.type_ = dtype::bf16;
  p.packed_ = true;
  p.rows_ = m.rows();
  p.cols_ = k;
  p.buf_ = aligned_buffer(static_cast<size_t>(blocks * w * k) * 2);
  uint16_t* out = p.bf16();
  std::vector<float> row(static_cast<size_t>(k));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t lane = 0; lane < w; ++lane) {
      const int64_t r = b * w + lane;
      if (r < m.rows()) m.row_f32(r, row.data());
      for (int64_t c = 0; c < k; ++c)
        out[(b * k + c) * w + lane] = r < m.rows() ? f32_to_bf16(row[static_cast<size_t>(c)]) : 0;
    }
  return p;
}

void matrix::row_f32(int64_t r, float* out) const {
  if (packed_) {
    const int64_t w = pack_width, b = r / w, lane = r % w;
    const uint16_t* s = bf16();
    for (int64_t c = 0; c < cols_; ++c) out[c] = bf16_to_f32(s[(b * cols_ + c) * w + lane]);
    return;
  }
  if (type_ == dtype::f32) {
    std::memcpy(out, f32() + r * cols_, static_cast<size_t>(cols_) * 4);
  } else {
    const uint16_t* s = bf16() + r * cols_;
    for (int64_t i = 0; i < cols_; ++i) out[i] = bf16_to_f32(s[i]);
  }
}

std::vector<float> matrix::to_f32() const {
  std::vector<float> out(static_cast<size_t>(rows_ * cols_));
  for (int64_t r = 0; r < rows_; ++r) row_f32(r, out.data() + r * cols_);
  return out;
}

}  // namespace sy::model
