#pragma once
/// Element types, bf16/f16 conversion, and the weight matrix type every kernel consumes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace sy::model {

enum class dtype : uint8_t { f32, bf16, f16, f64, i64, i32, i16, i8, u8, f8_e4m3, boolean };

[[nodiscard]] size_t dtype_size(dtype t);
/// The safetensors spelling ("F32", "BF16", ...), and back.
[[nodiscard]] const char* dtype_name(dtype t);
[[nodiscard]] std::optional<dtype> dtype_from_name(std::string_view name);

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// Round to nearest even, as PyTorch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

[[nodiscard]] float f16_to_f32(uint16_t v);
[[nodiscard]] uint16_t f32_to_f16(float f);
[[nodiscard]] float f8e4m3_to_f32(uint8_t v);
[[nodiscard]] uint8_t f32_to_f8e4m3(float f);

/// Converts `n` elements of type `src_type` at `src` to f32.
/// Returns false for a type that is not a floating-point type.
bool convert_to_f32(dtype src_type, const void* src, float* dst, size_t n);

/// 64-byte aligned, uninitialised storage.
class aligned_buffer {
 public:
  aligned_buffer() = default;
  explicit aligned_buffer(size_t bytes);
  [[nodiscard]] std::byte* data() { return ptr_.get(); }
  [[nodiscard]] const std::byte* data() const { return ptr_.get(); }
  [[nodiscard]] size_t size() const { return size_; }

 private:
  struct deleter {
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, deleter> ptr_;
  size_t size_ = 0;
};

/// A row-major weight matrix [rows, cols] stored as f32 or bf16. Kernels compute y = x · Wᵀ,
/// so `rows` is the output features and `cols` the input features (PyTorch's Linear layout).
class matrix {
 public:
  matrix() = default;
  matrix(dtype type, int64_t rows, int64_t cols);

  /// A bf16 copy of `m` in the GEMM-friendly packed layout: column blocks of 16 output rows, each
  /// stored k-major ([rows/16][cols][16], zero-padded). Kernels read it without widening or
  /// repacking; `row_f32` and `to_f32` still give the logical row-major values.
  static matrix packed_from(const matrix& m);
  static constexpr int64_t pack_width = 16;

  /// Copies `src` (any float dtype, rows×cols elements) into a matrix stored as `storage`.
  static matrix from(dtype storage, dtype src_type, const void* src, int64_t rows, int64_t cols);
  static matrix from_f32(dtype storage, std::span<const float> src, int64_t rows, int64_t cols);

  [[nodiscard]] dtype type() const { return type_; }
  [[nodiscard]] int64_t rows() const { return rows_; }
  [[nodiscard]] int64_t cols() const { return cols_; }
  [[nodiscard]] bool empty() const { return rows_ == 0; }
  [[nodiscard]] bool packed() const { return packed_; }
  /// Bytes of storage (what a kernel reads to use the whole matrix).
  [[nodiscard]] size_t bytes() const { return buf_.size(); }
  [[nodiscard]] const float* f32() const { return reinterpret_cast<const float*>(buf_.data()); }
  [[nodiscard]] float* f32() { return reinterpret_cast<float*>(buf_.data()); }
  [[nodiscard]] const uint16_t* bf16() const { return reinterpret_cast<const uint16_t*>(buf_.data()); }
  [[nodiscard]] uint16_t* bf16() { return reinterpret_cast<uint16_t*>(buf_.data()); }
  [[nodiscard]] const std::byte* raw() const { return buf_.data(); }
  [[nodiscard]] std::byte* raw() { return buf_.data(); }

  /// Row r as f32 (converted when stored as bf16).
  void row_f32(int64_t r, float* out) const;
  /// The whole matrix as f32.
  [[nodiscard]] std::vector<float> to_f32() const;

 private:
  dtype type_ = dtype::f32;
  bool packed_ = false;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  aligned_buffer buf_;
};

}  // namespace sy::model
