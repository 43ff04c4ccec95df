#include "model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace sy::model {

namespace {

using json = nlohmann::json;
constexpr uint64_t max_header_bytes = 100ull << 20;  // same bound as the reference implementation

caf::error fail(model_errc c, const std::string& file, const std::string& what) {
  return make_error(c, file + ": " + what);
}

}  // namespace

int64_t tensor_ref::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string tensor_ref::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

safetensors_file::~safetensors_file() {
  if (map_) munmap(map_, map_size_);
}

caf::expected<std::shared_ptr<safetensors_file>> safetensors_file::open(const std::filesystem::path& path) {
  std::shared_ptr<safetensors_file> f(new safetensors_file());
  f->path_ = path.string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(model_errc::io_error, f->path_, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return fail(model_errc::io_error, f->path_, std::string("cannot stat: ") + std::strerror(e));
  }
  f->map_size_ = static_cast<size_t>(st.st_size);
  if (f->map_size_ < 8) {
    ::close(fd);
    return fail(model_errc::bad_format, f->path_,
                "file is " + std::to_string(f->map_size_) + " bytes, too short for a safetensors header");
  }
  void* p = mmap(nullptr, f->map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) return fail(model_errc::io_error, f->path_, std::string("cannot mmap: ") + std::strerror(e));
  f->map_ = p;
  if (auto err = f->index(static_cast<const std::byte*>(p), f->map_size_)) return err;
  return f;
}

caf::expected<std::shared_ptr<safetensors_file>> safetensors_file::parse(std::vector<std::byte> image,
                                                                         std::string display_name) {
  std::shared_ptr<safetensors_file> f(new safetensors_file());
  f->path_ = std::move(display_name);
  f->owned_ = std::move(image);
  if (f->owned_.size() < 8)
    return fail(model_errc::bad_format, f->path_,
                "file is " + std::to_string(f->owned_.size()) + " bytes, too short for a safetensors header");
  if (auto err = f->index(f->owned_.data(), f->owned_.size())) return err;
  return f;
}

caf::error safetensors_file::index(const std::byte* base, size_t size) {
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian on every platform we build for
  if (header_len > max_header_bytes)
    return fail(model_errc::bad_format, path_, "header length " + std::to_string(header_len) + " exceeds the 100 MiB limit");
  if (header_len > size - 8)
    return fail(model_errc::bad_format, path_,
                "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                    std::to_string(size) + " bytes): truncated file?");
  const char* hdr = reinterpret_cast<const char*>(base + 8);
  json j = json::parse(hdr, hdr + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return fail(model_errc::bad_format, path_, "header is not well-formed JSON");
  if (!j.is_object()) return fail(model_errc::bad_format, path_, "header is not a JSON object");
  const std::byte* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) return fail(model_errc::bad_format, path_, "__metadata__ is not an object");
      for (auto& [k, mv] : v.items()) {
        if (!mv.is_string())
          return fail(model_errc::bad_format, path_, "__metadata__." + k + " is not a string");
        metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object()) return fail(model_errc::bad_format, path_, where + " is not an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string())
      return fail(model_errc::bad_format, path_, where + ": missing or non-string 'dtype'");
    if (sh == v.end() || !sh->is_array())
      return fail(model_errc::bad_format, path_, where + ": missing or non-array 'shape'");
    if (off == v.end() || !off->is_array() || off->size() != 2)
      return fail(model_errc::bad_format, path_, where + ": 'data_offsets' must be an array of two integers");
    auto type = dtype_from_name(dt->get<std::string>());
    if (!type) return fail(model_errc::unsupported, path_, where + ": unknown dtype '" + dt->get<std::string>() + "'");
    tensor_ref t;
    t.name = name;
    t.type = *type;
    t.file = path_;
    uint64_t count = 1;
    for (auto& d : *sh) {
      if (!d.is_number_unsigned())
        return fail(model_errc::bad_format, path_, where + ": shape entries must be non-negative integers");
      uint64_t dim = d.get<uint64_t>();
      if (dim > (1ull << 40) || (dim && count > (1ull << 62) / dim))
        return fail(model_errc::bad_format, path_, where + ": shape is absurdly large");
      count *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
      return fail(model_errc::bad_format, path_, where + ": 'data_offsets' must be non-negative integers");
    uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    if (begin > end) return fail(model_errc::bad_format, path_, where + ": data_offsets begin > end");
    if (end > data_size)
      return fail(model_errc::bad_format, path_,
                  where + ": data_offsets end " + std::to_string(end) + " is beyond the data section (" +
                      std::to_string(data_size) + " bytes): truncated file?");
    uint64_t expected = count * dtype_size(*type);
    if (end - begin != expected)
      return fail(model_errc::bad_format, path_,
                  where + ": holds " + std::to_string(end - begin) + " bytes but dtype " + dt->get<std::string>() +
                      " × shape " + t.shape_string() + " needs " + std::to_string(expected));
    t.data = data + begin;
    t.nbytes = end - begin;
    ranges.emplace_back(begin, end);
    tensors_.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second && ranges[i].first != ranges[i].second &&
        ranges[i - 1].first != ranges[i - 1].second)
      return fail(model_errc::bad_format, path_,
                  "tensor byte ranges overlap at offset " + std::to_string(ranges[i].first));
  return {};
}

const tensor_ref* safetensors_file::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

tensor_out tensor_out::f32(std::string name, std::vector<int64_t> shape, const std::vector<float>& v) {
  tensor_out t{std::move(name), dtype::f32, std::move(shape), {}};
  t.bytes.resize(v.size() * 4);
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

tensor_out tensor_out::i64(std::string name, std::vector<int64_t> shape, const std::vector<int64_t>& v) {
  tensor_out t{std::move(name), dtype::i64, std::move(shape), {}};
  t.bytes.resize(v.size() * 8);
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

caf::error write_safetensors(const std::filesystem::path& path, const std::vector<tensor_out>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& t : tensors) {
    h[t.name] = {{"dtype", dtype_name(t.type)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string header = h.dump();
  while ((header.size() + 8) % 8) header.push_back(' ');  // keep the data section 8-byte aligned
  auto tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return make_error(model_errc::io_error, tmp.string() + ": cannot open for writing");
    uint64_t len = header.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (auto& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
    out.flush();
    if (!out) return make_error(model_errc::io_error, tmp.string() + ": write failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return make_error(model_errc::io_error, path.string() + ": rename failed: " + ec.message());
  return {};
}

caf::expected<checkpoint> checkpoint::open(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  checkpoint c;
  c.dir_ = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return make_error(model_errc::io_error, dir.string() + ": not a directory");
  std::vector<fs::path> shards;
  auto index_path = dir / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    json j = json::parse(in, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return make_error(model_errc::bad_format, index_path.string() + ": not well-formed JSON");
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object())
      return make_error(model_errc::missing_key, index_path.string() + ": missing object 'weight_map'");
    std::set<std::string> files;
    for (auto& [k, v] : wm->items()) {
      if (!v.is_string())
        return make_error(model_errc::bad_format, index_path.string() + ": weight_map." + k + " is not a string");
      auto f = v.get<std::string>();
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        return make_error(model_errc::bad_value, index_path.string() + ": weight_map." + k + " names a path outside the folder");
      files.insert(f);
    }
    for (auto& f : files) shards.push_back(dir / f);
  } else if (fs::exists(dir / "model.safetensors")) {
    shards.push_back(dir / "model.safetensors");
  } else {
    for (auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".safetensors" && e.path().filename() != "reference.safetensors")
        shards.push_back(e.path());
    std::sort(shards.begin(), shards.end());
  }
  if (shards.empty()) return make_error(model_errc::missing_key, dir.string() + ": no *.safetensors weights found");
  for (auto& s : shards) {
    auto f = safetensors_file::open(s);
    if (!f) return f.error();
    c.files_.push_back(*f);
  }
  for (auto& f : c.files_)
    for (auto& [name, t] : f->tensors()) {
      auto [it, inserted] = c.index_.emplace(name, &t);
      if (!inserted)
        return make_error(model_errc::bad_format, "tensor '" + name + "' appears in both " + it->second->file + " and " + t.file);
    }
  return c;
}

const tensor_ref* checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

caf::expected<const tensor_ref*> checkpoint::get(const std::string& name) const {
  if (auto t = find(name)) return t;
  return make_error(model_errc::missing_key, dir_.string() + ": missing tensor '" + name + "'");
}

caf::expected<const tensor_ref*> checkpoint::get(const std::string& name, const std::vector<int64_t>& shape) const {
  auto t = get(name);
  if (!t) return t;
  if ((*t)->shape != shape) {
    tensor_ref want;
    want.shape = shape;
    return make_error(model_errc::bad_value, (*t)->file + ": tensor '" + name + "' has shape " + (*t)->shape_string() +
                                                 ", the config implies " + want.shape_string());
  }
  return t;
}

std::vector<std::string> checkpoint::names() const {
  std::vector<std::string> out;
  for (auto& [k, v] : index_) out.push_back(k);
  return out;
}

size_t checkpoint::total_bytes() const {
  size_t n = 0;
  for (auto& [k, v] : index_) n += v->nbytes;
  return n;
}

caf::expected<std::vector<float>> read_f32(const tensor_ref& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (!convert_to_f32(t.type, t.data, out.data(), out.size()))
    return make_error(model_errc::bad_value, t.file + ": tensor '" + t.name + "' has dtype " + dtype_name(t.type) +
                                                 ", expected a floating-point type");
  return out;
}

caf::expected<std::vector<int64_t>> read_i64(const tensor_ref& t) {
  std::vector<int64_t> out(static_cast<size_t>(t.numel()));
  if (t.type == dtype::i64) {
    std::memcpy(out.data(), t.data, t.nbytes);
  } else if (t.type == dtype::i32) {
    for (size_t i = 0; i < out.size(); ++i) {
      int32_t v;
      std::memcpy(&v, t.data + i * 4, 4);
      out[i] = v;
    }
  } else {
    return make_error(model_errc::bad_value, t.file + ": tensor '" + t.name + "' has dtype " + dtype_name(t.type) +
                                                 ", expected I64 or I32");
  }
  return out;
}

}  // namespace sy::model
