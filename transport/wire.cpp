#include "transport/wire.hpp"

#include "model/tensor.hpp"

#include <caf/atom.hpp>
#include <caf/make_message.hpp>
#include <caf/message.hpp>

#include <algorithm>
#include <cassert>
#include <limits>
#include <array>
#include <bit>
#include <mutex>
#include <cstring>
#include <string>

namespace sy::transport {

namespace {

void put_u8(std::byte* p, uint8_t v) { p[0] = static_cast<std::byte>(v); }
void put_u16(std::byte* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void put_u32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void put_u64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
uint8_t get_u8(const std::byte* p) { return static_cast<uint8_t>(p[0]); }
uint16_t get_u16(const std::byte* p) {
  return static_cast<uint16_t>(static_cast<uint16_t>(p[0]) | static_cast<uint16_t>(p[1]) << 8);
}
uint32_t get_u32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

std::string num(uint64_t v) { return std::to_string(v); }

void put_fixed(std::byte* p, frame_kind kind, uint8_t dtype, uint64_t batch_id, uint64_t epoch, uint32_t layer,
               uint32_t hidden, uint32_t segments, uint32_t header_len) {
  put_u32(p + 0, wire_magic);
  put_u16(p + 4, wire_version);
  put_u8(p + 6, static_cast<uint8_t>(kind));
  put_u8(p + 7, dtype);
  put_u64(p + 8, batch_id);
  put_u64(p + 16, epoch);
  put_u32(p + 24, layer);
  put_u32(p + 28, hidden);
  put_u32(p + 32, segments);
  put_u32(p + 36, header_len);
}

bool known_dtype(uint8_t d) { return d == static_cast<uint8_t>(wire_dtype::bf16) || d == static_cast<uint8_t>(wire_dtype::f32); }

}  // namespace

size_t dtype_bytes(wire_dtype t) { return t == wire_dtype::f32 ? 4 : 2; }

const char* to_string(wire_dtype t) {
  switch (t) {
    case wire_dtype::bf16: return "bf16";
    case wire_dtype::f32: return "f32";
  }
  return "unknown";
}

const char* to_string(frame_kind k) {
  switch (k) {
    case frame_kind::request: return "request";
    case frame_kind::reply: return "reply";
    case frame_kind::error: return "error";
  }
  return "unknown";
}

uint64_t batch_header::total_rows() const {
  uint64_t n = 0;
  for (const auto& s : segments) n += s.rows;
  return n;
}

uint64_t batch_header::payload_bytes() const { return total_rows() * hidden * dtype_bytes(dtype); }

caf::error validate(const batch_header& h, uint64_t payload_length, const wire_limits& limits) {
  if (!known_dtype(static_cast<uint8_t>(h.dtype)))
    return make_error(wire_errc::bad_dtype, "wire: dtype code " + num(static_cast<uint8_t>(h.dtype)) + " unknown");
  if (h.segments.size() > limits.max_segments)
    return make_error(wire_errc::too_many_segments, "wire: " + num(h.segments.size()) + " segments, at most " +
                                                        num(limits.max_segments) + " allowed");
  if (h.segments.empty()) return make_error(wire_errc::bad_shape, "wire: a batch without segments");
  if (h.hidden == 0 || h.hidden > limits.max_hidden)
    return make_error(wire_errc::bad_shape,
                      "wire: hidden size " + num(h.hidden) + " outside [1, " + num(limits.max_hidden) + "]");
  uint64_t rows = 0;
  for (size_t i = 0; i < h.segments.size(); ++i) {
    if (h.segments[i].rows == 0)
      return make_error(wire_errc::bad_shape, "wire: segment " + num(i) + " (expert " +
                                                  num(h.segments[i].expert) + ") has no rows");
    if (__builtin_add_overflow(rows, uint64_t{h.segments[i].rows}, &rows))
      return make_error(wire_errc::too_large, "wire: the row count overflows");
  }
  uint64_t elems = 0;
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(rows, uint64_t{h.hidden}, &elems) ||
      __builtin_mul_overflow(elems, uint64_t{dtype_bytes(h.dtype)}, &bytes) || bytes > limits.max_payload_bytes)
    return make_error(wire_errc::too_large, "wire: " + num(rows) + " rows of hidden " + num(h.hidden) +
                                                " exceed the payload bound of " + num(limits.max_payload_bytes) +
                                                " bytes");
  if (bytes != payload_length)
    return make_error(wire_errc::length_mismatch, "wire: " + num(rows) + " rows × " + num(h.hidden) + " × " +
                                                      to_string(h.dtype) + " = " + num(bytes) +
                                                      " bytes, but the payload has " + num(payload_length));
  return {};
}

caf::error check_rows(const batch_header& h, uint64_t rows_bytes) {
  constexpr wire_limits none{std::numeric_limits<uint32_t>::max(), std::numeric_limits<uint32_t>::max(),
                             std::numeric_limits<uint64_t>::max()};
  return validate(h, rows_bytes, none);
}

namespace {

/// Recycles large row buffers by power-of-two size class (see row_buffer).
class buffer_cache {
 public:
  static constexpr size_t min_bytes = size_t{4} << 10;
  static constexpr int classes = 48;
  static constexpr size_t per_class = 16;
  static constexpr size_t max_total = size_t{256} << 20;

  static buffer_cache& instance() {
    static buffer_cache* c = new buffer_cache();  // never destroyed: buffers may be freed during exit
    return *c;
  }
  /// The class of a request of `bytes` (≥ min_bytes), or -1 when it is too large to round.
  static int class_of(size_t bytes) {
    const int c = std::bit_width(bytes - 1);
    return c < classes ? c : -1;
  }
  void* take(int c) {
    std::lock_guard lock(mu_);
    auto& v = free_[static_cast<size_t>(c)];
    if (v.empty()) return nullptr;
    void* p = v.back();
    v.pop_back();
    total_ -= size_t{1} << c;
    return p;
  }
  bool give(int c, void* p) {
    std::lock_guard lock(mu_);
    auto& v = free_[static_cast<size_t>(c)];
    if (v.size() >= per_class || total_ + (size_t{1} << c) > max_total) return false;
    v.push_back(p);
    total_ += size_t{1} << c;
    return true;
  }

 private:
  std::mutex mu_;
  std::array<std::vector<void*>, classes> free_;
  size_t total_ = 0;
};

}  // namespace

void row_buffer::deleter::operator()(std::byte* p) const {
  if (bytes >= buffer_cache::min_bytes) {
    const int c = buffer_cache::class_of(bytes);
    if (c >= 0 && buffer_cache::instance().give(c, p)) return;
  }
  std::free(p);
}

caf::expected<row_buffer> row_buffer::allocate(size_t bytes) {
  size_t rounded = (bytes + 63) / 64 * 64;
  if (rounded < bytes) return make_error(wire_errc::out_of_memory, "wire: cannot allocate " + num(bytes) + " bytes");
  void* p = nullptr;
  if (bytes >= buffer_cache::min_bytes) {
    const int c = buffer_cache::class_of(bytes);
    if (c < 0) return make_error(wire_errc::out_of_memory, "wire: cannot allocate " + num(bytes) + " bytes");
    p = buffer_cache::instance().take(c);
    if (p == nullptr) p = std::aligned_alloc(64, size_t{1} << c);
  } else {
    p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  }
  if (p == nullptr) return make_error(wire_errc::out_of_memory, "wire: cannot allocate " + num(bytes) + " bytes");
  row_buffer b;
  b.ptr_ = std::unique_ptr<std::byte, deleter>(static_cast<std::byte*>(p), deleter{bytes});
  b.size_ = bytes;
  return b;
}

std::span<const std::byte> token_batch::segment_rows(size_t i) const {
  const size_t row_bytes = size_t{header.hidden} * dtype_bytes(header.dtype);
  size_t offset = 0;
  for (size_t s = 0; s < i; ++s) offset += header.segments[s].rows * row_bytes;
  return rows.bytes().subspan(offset, header.segments[i].rows * row_bytes);
}

std::span<std::byte> token_batch::segment_rows(size_t i) {
  auto c = std::as_const(*this).segment_rows(i);
  return {const_cast<std::byte*>(c.data()), c.size()};
}

caf::expected<token_batch> make_batch(batch_header header) {
  const wire_limits unbounded{UINT32_MAX, UINT32_MAX, UINT64_MAX};
  uint64_t rows = header.total_rows();
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(rows, uint64_t{header.hidden} * dtype_bytes(header.dtype), &bytes))
    return make_error(wire_errc::too_large, "wire: batch size overflows");
  if (auto err = validate(header, bytes, unbounded)) return err;
  auto buf = row_buffer::allocate(bytes);
  if (!buf) return buf.error();
  return token_batch{std::move(header), std::move(*buf)};
}

caf::expected<token_batch> make_batch(batch_header header, std::span<const float> rows_f32) {
  auto b = make_batch(std::move(header));
  if (!b) return b.error();
  const uint64_t elems = b->header.total_rows() * b->header.hidden;
  if (rows_f32.size() != elems)
    return make_error(wire_errc::length_mismatch, "wire: the header describes " + num(elems) +
                                                      " elements, the rows given hold " + num(rows_f32.size()));
  rows_from_f32(rows_f32, b->header.dtype, b->rows.data());
  return b;
}

void rows_from_f32(std::span<const float> in, wire_dtype t, std::byte* out) {
  if (t == wire_dtype::f32) {
    std::memcpy(out, in.data(), in.size_bytes());
    return;
  }
  auto* o = reinterpret_cast<uint16_t*>(out);
  for (size_t i = 0; i < in.size(); ++i) o[i] = model::f32_to_bf16(in[i]);
}

void rows_to_f32(const std::byte* in, wire_dtype t, std::span<float> out) {
  if (t == wire_dtype::f32) {
    std::memcpy(out.data(), in, out.size_bytes());
    return;
  }
  const auto* p = reinterpret_cast<const uint16_t*>(in);
  for (size_t i = 0; i < out.size(); ++i) out[i] = model::bf16_to_f32(p[i]);
}

caf::error rows_to_f32(const token_batch& b, std::span<float> out) {
  const uint64_t elems = b.header.total_rows() * b.header.hidden;
  if (out.size() != elems || b.rows.size() != elems * dtype_bytes(b.header.dtype))
    return make_error(wire_errc::length_mismatch, "wire: rows_to_f32 needs " + num(elems) + " floats, got " +
                                                      num(out.size()));
  rows_to_f32(b.rows.data(), b.header.dtype, out);
  return {};
}

void encode_header_into(frame_kind kind, const batch_header& h, std::span<std::byte> out) {
  assert(out.size() == h.header_bytes());
  put_fixed(out.data(), kind, static_cast<uint8_t>(h.dtype), h.batch_id, h.epoch, h.layer, h.hidden,
            static_cast<uint32_t>(h.segments.size()), static_cast<uint32_t>(out.size()));
  std::byte* p = out.data() + wire_fixed_bytes;
  for (const auto& s : h.segments) {
    put_u32(p + 0, s.expert);
    put_u32(p + 4, s.slot);
    put_u32(p + 8, s.version);
    put_u32(p + 12, s.rows);
    p += wire_segment_bytes;
  }
}

std::vector<std::byte> encode_header(frame_kind kind, const batch_header& h) {
  std::vector<std::byte> out(h.header_bytes());
  encode_header_into(kind, h, out);
  return out;
}

encoded_frame encode_request(const request& r) { return {encode_header(frame_kind::request, r.header), r.rows.bytes()}; }

encoded_frame encode_reply(const reply& r) { return {encode_header(frame_kind::reply, r.header), r.rows.bytes()}; }

std::vector<std::byte> encode_error(uint64_t batch_id, uint64_t epoch, uint32_t layer, const caf::error& given) {
  // An empty error (a handler that failed without saying why) has no category to send (CAF would
  // dereference null): it goes out as handler_failed.
  const caf::error err = given ? given : make_error(wire_errc::handler_failed, "the handler failed without an error");
  std::string msg = describe(err);
  if (msg.size() > wire_max_error_message) {
    // Cut on a character boundary: the message stays UTF-8.
    size_t cut = wire_max_error_message;
    while (cut > 0 && (static_cast<unsigned char>(msg[cut]) & 0xC0) == 0x80) --cut;
    msg.resize(cut);
  }
  std::vector<std::byte> out(wire_fixed_bytes + wire_error_fixed_bytes + msg.size());
  put_fixed(out.data(), frame_kind::error, 0, batch_id, epoch, layer, 0, 0, static_cast<uint32_t>(out.size()));
  std::byte* p = out.data() + wire_fixed_bytes;
  put_u64(p, static_cast<uint64_t>(err.category()));
  put_u8(p + 8, err.code());
  put_u8(p + 9, 0);
  put_u16(p + 10, static_cast<uint16_t>(msg.size()));
  std::memcpy(p + wire_error_fixed_bytes, msg.data(), msg.size());
  return out;
}

caf::expected<decoded_frame> decode(std::span<const std::byte> in, uint64_t payload_length, const wire_limits& limits) {
  if (in.size() < wire_fixed_bytes)
    return make_error(wire_errc::truncated, "wire: header of " + num(in.size()) + " bytes, the fixed part has " +
                                                num(wire_fixed_bytes));
  const std::byte* p = in.data();
  if (uint32_t magic = get_u32(p); magic != wire_magic)
    return make_error(wire_errc::bad_magic, "wire: magic " + num(magic) + " is not a Switchyard frame");
  if (uint16_t v = get_u16(p + 4); v != wire_version)
    return make_error(wire_errc::bad_version, "wire: version " + num(v) + ", this build speaks " + num(wire_version));
  const uint8_t kind = get_u8(p + 6);
  if (kind < 1 || kind > 3) return make_error(wire_errc::bad_kind, "wire: frame kind " + num(kind) + " unknown");
  decoded_frame f;
  f.kind = static_cast<frame_kind>(kind);
  const uint8_t dtype = get_u8(p + 7);
  f.header.batch_id = get_u64(p + 8);
  f.header.epoch = get_u64(p + 16);
  f.header.layer = get_u32(p + 24);
  const uint32_t hidden = get_u32(p + 28);
  const uint32_t count = get_u32(p + 32);
  const uint32_t declared = get_u32(p + 36);
  if (declared > in.size())
    return make_error(wire_errc::truncated, "wire: header declares " + num(declared) + " bytes, " + num(in.size()) +
                                                " arrived");
  if (declared != in.size())
    return make_error(wire_errc::length_mismatch, "wire: header declares " + num(declared) + " bytes, " +
                                                      num(in.size()) + " arrived");

  if (f.kind == frame_kind::error) {
    if (dtype != 0) return make_error(wire_errc::bad_dtype, "wire: an error frame with dtype " + num(dtype));
    if (hidden != 0 || count != 0)
      return make_error(wire_errc::bad_shape, "wire: an error frame with rows or segments");
    if (payload_length != 0)
      return make_error(wire_errc::length_mismatch, "wire: an error frame with a payload of " + num(payload_length));
    if (in.size() < wire_fixed_bytes + wire_error_fixed_bytes)
      return make_error(wire_errc::truncated, "wire: error frame shorter than its fixed part");
    const std::byte* e = p + wire_fixed_bytes;
    const uint64_t category = get_u64(e);
    const uint8_t code = get_u8(e + 8);
    const uint16_t len = get_u16(e + 10);
    if (len > wire_max_error_message)
      return make_error(wire_errc::length_mismatch, "wire: error message of " + num(len) + " bytes, at most " +
                                                        num(wire_max_error_message));
    if (in.size() != wire_fixed_bytes + wire_error_fixed_bytes + len)
      return make_error(wire_errc::length_mismatch, "wire: error message length " + num(len) +
                                                        " disagrees with the header length " + num(in.size()));
    std::string msg(reinterpret_cast<const char*>(e + wire_error_fixed_bytes), len);
    f.error = caf::error(code, static_cast<caf::atom_value>(category), caf::make_message(std::move(msg)));
    if (!f.error)  // code 0 means "no error" to CAF; the peer sent an error frame, so keep one
      f.error = make_error(wire_errc::handler_failed, "wire: the peer sent an error frame without a code");
    return f;
  }

  if (!known_dtype(dtype)) return make_error(wire_errc::bad_dtype, "wire: dtype code " + num(dtype) + " unknown");
  if (count > limits.max_segments)
    return make_error(wire_errc::too_many_segments, "wire: " + num(count) + " segments, at most " +
                                                        num(limits.max_segments) + " allowed");
  // count is bounded, so this cannot overflow.
  const uint64_t need = wire_fixed_bytes + uint64_t{wire_segment_bytes} * count;
  if (need != in.size())
    return make_error(wire_errc::length_mismatch, "wire: " + num(count) + " segments need a header of " +
                                                      num(need) + " bytes, it has " + num(in.size()));
  f.header.hidden = hidden;
  f.header.dtype = static_cast<wire_dtype>(dtype);
  f.header.segments.resize(count);
  const std::byte* s = p + wire_fixed_bytes;
  for (auto& seg : f.header.segments) {
    seg.expert = get_u32(s + 0);
    seg.slot = get_u32(s + 4);
    seg.version = get_u32(s + 8);
    seg.rows = get_u32(s + 12);
    s += wire_segment_bytes;
  }
  if (auto err = validate(f.header, payload_length, limits)) return err;
  return f;
}

caf::expected<token_batch> decode_batch(std::span<const std::byte> header, std::span<const std::byte> payload,
                                        const wire_limits& limits) {
  auto f = decode(header, payload.size(), limits);
  if (!f) return f.error();
  if (f->kind == frame_kind::error) return f->error;
  auto buf = row_buffer::allocate(payload.size());
  if (!buf) return buf.error();
  if (!payload.empty()) std::memcpy(buf->data(), payload.data(), payload.size());
  return token_batch{std::move(f->header), std::move(*buf)};
}

caf::error check_reply(const batch_header& req, const batch_header& rep) {
  if (rep.batch_id != req.batch_id)
    return make_error(wire_errc::segment_mismatch, "wire: reply for batch " + num(rep.batch_id) +
                                                       " answers request " + num(req.batch_id));
  if (rep.dtype != req.dtype)
    return make_error(wire_errc::dtype_mismatch, std::string("wire: reply in ") + to_string(rep.dtype) +
                                                     " to a request in " + to_string(req.dtype));
  if (rep.hidden != req.hidden)
    return make_error(wire_errc::segment_mismatch, "wire: reply hidden size " + num(rep.hidden) + ", request " +
                                                       num(req.hidden));
  if (rep.segments != req.segments)
    return make_error(wire_errc::segment_mismatch, "wire: reply segments differ from the request's (batch " +
                                                       num(req.batch_id) + ")");
  return {};
}

void slot_inventory::add(const held_slot& s) { slots_[s.slot] = s; }

bool slot_inventory::remove(uint32_t slot) { return slots_.erase(slot) > 0; }

caf::error slot_inventory::check(const batch_header& h) const {
  for (const auto& seg : h.segments) {
    auto it = slots_.find(seg.slot);
    const bool match = it != slots_.end() && it->second.layer == h.layer && it->second.expert == seg.expert;
    if (!match) {
      const bool held_elsewhere = std::any_of(slots_.begin(), slots_.end(), [&](const auto& kv) {
        return kv.second.layer == h.layer && kv.second.expert == seg.expert;
      });
      const std::string what = "layer " + num(h.layer) + " expert " + num(seg.expert);
      if (!held_elsewhere) return make_error(wire_errc::unknown_expert, "host: " + what + " is not held here");
      return make_error(wire_errc::unknown_slot, "host: slot " + num(seg.slot) + " does not hold " + what);
    }
    if (it->second.version != seg.version)
      return make_error(wire_errc::version_mismatch, "host: slot " + num(seg.slot) + " holds version " +
                                                         num(it->second.version) + ", the batch asks for " +
                                                         num(seg.version));
    if (it->second.hidden != h.hidden)
      return make_error(wire_errc::segment_mismatch, "host: slot " + num(seg.slot) + " has hidden size " +
                                                         num(it->second.hidden) + ", the batch " + num(h.hidden));
  }
  return {};
}

}  // namespace sy::transport
