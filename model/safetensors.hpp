#pragma once
/// Reading and writing the safetensors format, and checkpoints sharded over several such files.
///
/// A file is memory-mapped and its header fully validated (JSON well-formed, known dtypes, every
/// tensor's byte range inside the data section, ranges not overlapping, byte count equal to the dtype
/// size times the shape's product) before any tensor data is read.
#include "model/error.hpp"
#include "model/tensor.hpp"

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sy::model {

/// One tensor inside a mapped file. `data` stays valid while the owning file is alive.
struct tensor_ref {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;
  std::string file;  ///< path of the file it lives in, for messages

  [[nodiscard]] int64_t numel() const;
  /// "[a, b, c]"
  [[nodiscard]] std::string shape_string() const;
};

/// A memory-mapped, validated safetensors file.
class safetensors_file {
 public:
  /// Opens and validates `path`. Errors name the file and the offending tensor or field.
  static caf::expected<std::shared_ptr<safetensors_file>> open(const std::filesystem::path& path);
  /// Validates an in-memory image (the same checks as `open`); used by tests and fuzzers.
  static caf::expected<std::shared_ptr<safetensors_file>> parse(std::vector<std::byte> image,
                                                                std::string display_name);

  ~safetensors_file();
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;

  [[nodiscard]] const std::map<std::string, tensor_ref>& tensors() const { return tensors_; }
  [[nodiscard]] const tensor_ref* find(const std::string& name) const;
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const { return metadata_; }
  [[nodiscard]] const std::string& path() const { return path_; }

 private:
  safetensors_file() = default;
  caf::error index(const std::byte* base, size_t size);

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<std::byte> owned_;
  std::map<std::string, tensor_ref> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// A tensor to write: name, dtype, shape and its bytes (row-major, little-endian).
struct tensor_out {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;

  static tensor_out f32(std::string name, std::vector<int64_t> shape, const std::vector<float>& v);
  static tensor_out i64(std::string name, std::vector<int64_t> shape, const std::vector<int64_t>& v);
};

/// Writes `tensors` to `path` atomically (temporary file, then rename).
[[nodiscard]] caf::error write_safetensors(const std::filesystem::path& path, const std::vector<tensor_out>& tensors,
                                           const std::map<std::string, std::string>& metadata = {});

/// All tensors of a checkpoint folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`, or every `*.safetensors` file of the folder.
class checkpoint {
 public:
  static caf::expected<checkpoint> open(const std::filesystem::path& dir);

  [[nodiscard]] const tensor_ref* find(const std::string& name) const;
  /// The tensor, or an error naming it and the folder.
  [[nodiscard]] caf::expected<const tensor_ref*> get(const std::string& name) const;
  /// The tensor checked against `shape`; the error names the tensor, the file and both shapes.
  [[nodiscard]] caf::expected<const tensor_ref*> get(const std::string& name,
                                                     const std::vector<int64_t>& shape) const;
  [[nodiscard]] std::vector<std::string> names() const;
  [[nodiscard]] const std::filesystem::path& dir() const { return dir_; }
  [[nodiscard]] size_t total_bytes() const;

 private:
  std::filesystem::path dir_;
  std::vector<std::shared_ptr<safetensors_file>> files_;
  std::map<std::string, const tensor_ref*> index_;
};

/// Copies a tensor into f32, whatever its float dtype.
[[nodiscard]] caf::expected<std::vector<float>> read_f32(const tensor_ref& t);
/// Copies an integer tensor (I64 or I32) into int64.
[[nodiscard]] caf::expected<std::vector<int64_t>> read_i64(const tensor_ref& t);

}  // namespace sy::model
