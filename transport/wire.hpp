#pragma once
/// The data plane's wire format: token batches (requests and replies) and error frames.
///
/// A frame is a header (it travels in the UCX active-message header) and a payload (the AM
/// payload): the rows of every segment, segment after segment, each row `hidden` elements of the
/// frame's dtype. All integers are little-endian whatever the host.
///
///   offset size field
///        0    4 magic 0x42545953 ("SYTB" as bytes)
///        4    2 version (1)
///        6    1 kind: 1 request, 2 reply, 3 error
///        7    1 dtype: 1 bf16, 2 f32 (0 on error frames)
///        8    8 batch id
///       16    8 placement epoch
///       24    4 layer
///       28    4 hidden size (0 on error frames)
///       32    4 segment count (0 on error frames)
///       36    4 header length in bytes, this field included
///       40 16·n segments: expert u32, slot u32, weight version u32, rows u32
///   error frames instead: category u64 (a caf::atom_value), code u8, reserved u8 (0),
///                         message length u16, message bytes (UTF-8, at most 1024)
///
/// `decode` checks every field and every length (header length, segment count against its bound,
/// Σrows × hidden × dtype size against the payload length, computed without overflow) before
/// anything is allocated or a row is read; untrusted bytes never assert.
#include "transport/error.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

namespace sy::transport {

enum class wire_dtype : uint8_t { bf16 = 1, f32 = 2 };
enum class frame_kind : uint8_t { request = 1, reply = 2, error = 3 };

/// Bytes per element: 2 for bf16, 4 for f32.
[[nodiscard]] size_t dtype_bytes(wire_dtype t);
[[nodiscard]] const char* to_string(wire_dtype t);
[[nodiscard]] const char* to_string(frame_kind k);

inline constexpr uint32_t wire_magic = 0x42545953u;
inline constexpr uint16_t wire_version = 1;
inline constexpr size_t wire_fixed_bytes = 40;
inline constexpr size_t wire_segment_bytes = 16;
inline constexpr size_t wire_error_fixed_bytes = 12;
inline constexpr size_t wire_max_error_message = 1024;

/// Bounds a receiver enforces. The defaults keep a header under 4.2 KiB (UCX's AM header limit on
/// TCP is far above that) and a payload under 1 GiB.
struct wire_limits {
  uint32_t max_segments = 256;
  uint32_t max_hidden = 65536;
  uint64_t max_payload_bytes = uint64_t{1} << 30;
};

/// One expert's share of a batch: `rows` consecutive rows of the payload for `expert`, to run on
/// the host's `slot`, which must hold weight `version`.
struct segment {
  uint32_t expert = 0;
  uint32_t slot = 0;
  uint32_t version = 0;
  uint32_t rows = 0;
  bool operator==(const segment&) const = default;
};

/// Everything a request or reply frame says except its rows.
struct batch_header {
  uint64_t batch_id = 0;
  uint64_t epoch = 0;
  uint32_t layer = 0;
  uint32_t hidden = 0;
  wire_dtype dtype = wire_dtype::bf16;
  std::vector<segment> segments;

  /// Σ rows over segments.
  [[nodiscard]] uint64_t total_rows() const;
  /// Σ rows × hidden × dtype size. Meaningful once `validate` accepted the header (no overflow).
  [[nodiscard]] uint64_t payload_bytes() const;
  /// Bytes of the encoded header (40 + 16 per segment).
  [[nodiscard]] size_t header_bytes() const { return wire_fixed_bytes + wire_segment_bytes * segments.size(); }
};

/// Checks a header's shape against `limits` and against `payload_length`: the same checks `decode`
/// makes after parsing (too_many_segments, bad_shape, bad_dtype, too_large, length_mismatch).
[[nodiscard]] caf::error validate(const batch_header& h, uint64_t payload_length, const wire_limits& limits = {});

/// `validate` without limits: that a batch's rows hold exactly what its header describes. For code
/// handed a batch that already crossed a link (whose receiver applied its configured limits) or
/// that came from the in-process link, before it indexes the rows by the header's segments.
[[nodiscard]] caf::error check_rows(const batch_header& h, uint64_t rows_bytes);

/// Owning, 64-byte aligned, uninitialised bytes. Allocation failure is an error, not an exception.
///
/// Buffers of 4 KiB and more are recycled: they are carved from power-of-two size classes, and a
/// freed one goes back to a process-wide cache (at most 16 per class and 256 MiB in all) instead of
/// to the allocator. Batches of a step come and go at the same sizes; without the cache every
/// received batch would be fresh pages from the kernel (measured: half the stream bandwidth at
/// 512 KiB), and a one-row batch a trip through malloc's bins. The unused tail of a class is never
/// touched, so it costs address space, not memory.
class row_buffer {
 public:
  row_buffer() = default;
  [[nodiscard]] static caf::expected<row_buffer> allocate(size_t bytes);
  [[nodiscard]] std::byte* data() { return ptr_.get(); }
  [[nodiscard]] const std::byte* data() const { return ptr_.get(); }
  [[nodiscard]] size_t size() const { return size_; }
  [[nodiscard]] std::span<std::byte> bytes() { return {ptr_.get(), size_}; }
  [[nodiscard]] std::span<const std::byte> bytes() const { return {ptr_.get(), size_}; }

 private:
  struct deleter {
    size_t bytes;  // value-initialised (0) by unique_ptr's default constructor
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, deleter> ptr_;
  size_t size_ = 0;
};

/// A header and its rows. Move-only; links move it end to end without copying the rows.
struct token_batch {
  batch_header header;
  row_buffer rows;  ///< header.payload_bytes() bytes

  /// The bytes of segment `i`'s rows inside `rows`.
  [[nodiscard]] std::span<const std::byte> segment_rows(size_t i) const;
  [[nodiscard]] std::span<std::byte> segment_rows(size_t i);
};

/// A batch sent to an expert host.
struct request : token_batch {};
/// The expert outputs for a request: the same segments in the same order, same dtype and hidden.
struct reply : token_batch {};

/// A batch whose rows are uninitialised, sized from the (validated) header.
[[nodiscard]] caf::expected<token_batch> make_batch(batch_header header);
/// A batch whose rows are `rows_f32` (Σrows × hidden floats) converted to `header.dtype`
/// (bf16: round to nearest even, NaN kept).
[[nodiscard]] caf::expected<token_batch> make_batch(batch_header header, std::span<const float> rows_f32);
/// Converts `in.size()` floats to `t` at `out` (which holds in.size() × dtype_bytes(t) bytes).
void rows_from_f32(std::span<const float> in, wire_dtype t, std::byte* out);
/// Converts `out.size()` elements of type `t` at `in` to f32.
void rows_to_f32(const std::byte* in, wire_dtype t, std::span<float> out);
/// All rows of `b` as f32; `out.size()` must be total_rows × hidden.
[[nodiscard]] caf::error rows_to_f32(const token_batch& b, std::span<float> out);

/// A frame ready to send: `header` for the AM header; `payload` views the batch's rows (no copy)
/// and stays valid while the batch does.
struct encoded_frame {
  std::vector<std::byte> header;
  std::span<const std::byte> payload;
};

[[nodiscard]] std::vector<std::byte> encode_header(frame_kind kind, const batch_header& h);
/// The same bytes into `out`, which holds exactly `h.header_bytes()` (a buffer the caller owns: no
/// allocation per frame).
void encode_header_into(frame_kind kind, const batch_header& h, std::span<std::byte> out);
[[nodiscard]] encoded_frame encode_request(const request& r);
[[nodiscard]] encoded_frame encode_reply(const reply& r);
/// An error frame for batch `batch_id` carrying `err` (any layer's; its message cut at 1024 bytes,
/// on a character boundary). An empty `err` is sent as handler_failed.
[[nodiscard]] std::vector<std::byte> encode_error(uint64_t batch_id, uint64_t epoch, uint32_t layer,
                                                  const caf::error& err);

/// What `decode` found in a header.
struct decoded_frame {
  frame_kind kind = frame_kind::request;
  /// Request and reply: every field. Error frames: batch_id, epoch and layer only.
  batch_header header;
  /// Error frames: the error the peer sent (code, category and message as they were).
  caf::error error;
};

/// Parses and validates a header received with a payload of `payload_length` bytes. Reads only
/// `header`; on success the caller may allocate `payload_length` bytes and receive the rows.
[[nodiscard]] caf::expected<decoded_frame> decode(std::span<const std::byte> header, uint64_t payload_length,
                                                  const wire_limits& limits = {});

/// `decode` for a request or reply frame, then a copy of `payload` into a new batch.
[[nodiscard]] caf::expected<token_batch> decode_batch(std::span<const std::byte> header,
                                                      std::span<const std::byte> payload,
                                                      const wire_limits& limits = {});

/// Checks that a reply answers its request: same batch id, dtype (dtype_mismatch), hidden size and
/// segments (segment_mismatch).
[[nodiscard]] caf::error check_reply(const batch_header& req, const batch_header& rep);

/// One slot an expert host holds.
struct held_slot {
  uint32_t slot = 0;
  uint32_t layer = 0;
  uint32_t expert = 0;
  uint32_t version = 0;
  uint32_t hidden = 0;
};

/// What a host holds, for the receiver-side check of a request. Not thread-safe: the owner
/// serialises `add`/`remove` with `check` (a host swaps a new inventory in between batches).
class slot_inventory {
 public:
  /// Adds or replaces the slot `s.slot`.
  void add(const held_slot& s);
  /// Returns whether the slot existed.
  bool remove(uint32_t slot);
  /// Accepts a request only if every segment names a held slot that holds that (layer, expert) at
  /// that version with the request's hidden size: unknown_expert (no slot holds the expert),
  /// unknown_slot (the slot is not held or holds another expert), version_mismatch, segment_mismatch
  /// (hidden size).
  [[nodiscard]] caf::error check(const batch_header& h) const;

 private:
  std::unordered_map<uint32_t, held_slot> slots_;
};

}  // namespace sy::transport
