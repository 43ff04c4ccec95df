// Fuzz target: the data plane's wire format (transport/wire.hpp).
//
// The first byte picks what the rest is:
//   0 mod 4: a received header (decode) with a payload length that agrees with what the header
//            declares (so the fuzzer gets past the length checks), under the default limits;
//   1 mod 4: the same with an arbitrary payload length (8 bytes) and tight limits;
//   2 mod 4: the description of a request or reply (ids, hidden size, dtype, up to 8 segments of
//            up to 8 rows, then the rows' bytes) that is encoded and decoded back;
//   3 mod 4: an error (code, category, layer, message of up to 1100 bytes) sent as an error frame
//            and decoded back.
// Checked: decode never fails other than with a typed wire error; a header it accepts passes
// validate, says the payload length it was given, and encodes back to the same bytes (error
// frames: but for the reserved byte); decode_batch of such a frame copies the payload and its
// segments tile it; decode(encode(x)) == x for batches (header and rows, also through f32) and
// error frames (code, category, message cut at 1024 bytes on a character boundary).
#include "fuzz_util.hpp"

#include "transport/wire.hpp"

#include <caf/atom.hpp>
#include <caf/make_message.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace sy::transport;
using sy::fuzz::byte_reader;

std::span<const std::byte> as_bytes(std::string_view s) { return {reinterpret_cast<const std::byte*>(s.data()), s.size()}; }

uint64_t declared_payload(std::string_view h) {
  // rows × hidden × dtype size as the header says (0 when it is too short or makes no sense).
  if (h.size() < wire_fixed_bytes) return 0;
  auto u32 = [&](size_t at) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(h[at + i])) << (8 * i);
    return v;
  };
  const uint64_t hidden = u32(28);
  const uint8_t dtype = static_cast<uint8_t>(h[7]);
  uint64_t rows = 0;
  for (size_t at = wire_fixed_bytes; at + wire_segment_bytes <= h.size(); at += wire_segment_bytes) rows += u32(at + 12);
  return rows * hidden * (dtype == 2 ? 4 : 2);
}

void check_wire_error(const caf::error& e) {
  SY_FUZZ_CHECK(wire_code(e) != wire_errc::none, "decode failed without a wire error code: %s", describe(e).c_str());
  SY_FUZZ_CHECK(!describe(e).empty(), "a wire error without a message");
}

void decoded_checks(std::string_view header, uint64_t payload_length, const wire_limits& lim) {
  auto f = decode(as_bytes(header), payload_length, lim);
  if (!f) return check_wire_error(f.error());
  if (f->kind == frame_kind::error) {
    SY_FUZZ_CHECK(payload_length == 0, "an error frame with a payload accepted");
    SY_FUZZ_CHECK(static_cast<bool>(f->error), "an error frame decoded to no error");
    // A code of 0 ("no error" to CAF) comes out as handler_failed; otherwise the frame encodes back
    // to its bytes, but for byte 49, reserved (written 0, not read).
    if (static_cast<uint8_t>(header[48]) == 0) {
      SY_FUZZ_CHECK(wire_code(f->error) == wire_errc::handler_failed, "an error frame of code 0 decoded as %s",
                    describe(f->error).c_str());
      return;
    }
    auto again = encode_error(f->header.batch_id, f->header.epoch, f->header.layer, f->error);
    SY_FUZZ_CHECK(again.size() == header.size(), "error frame re-encodes to %zu bytes, was %zu", again.size(), header.size());
    for (size_t i = 0; i < header.size(); ++i)
      SY_FUZZ_CHECK(i == 49 || again[i] == static_cast<std::byte>(header[i]), "error frame re-encodes differently at byte %zu", i);
    return;
  }
  const auto& h = f->header;
  SY_FUZZ_CHECK(!validate(h, payload_length, lim), "decode accepted a header validate refuses");
  SY_FUZZ_CHECK(h.payload_bytes() == payload_length, "payload_bytes %llu, payload %llu", (unsigned long long)h.payload_bytes(),
                (unsigned long long)payload_length);
  SY_FUZZ_CHECK(h.segments.size() <= lim.max_segments && h.hidden <= lim.max_hidden && payload_length <= lim.max_payload_bytes,
                "decode accepted a header past its limits");
  auto again = encode_header(f->kind, h);
  SY_FUZZ_CHECK(again.size() == header.size() && std::memcmp(again.data(), header.data(), header.size()) == 0,
                "a decoded header does not encode back to the same bytes");
  if (payload_length > (1u << 20)) return;
  std::vector<std::byte> payload(payload_length);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<std::byte>(i * 131 + 7);
  auto b = decode_batch(as_bytes(header), payload, lim);
  SY_FUZZ_CHECK(static_cast<bool>(b), "decode_batch refused what decode accepted: %s", describe(b.error()).c_str());
  SY_FUZZ_CHECK(b->rows.size() == payload.size() && (payload.empty() || std::memcmp(b->rows.data(), payload.data(), payload.size()) == 0),
                "decode_batch did not copy the payload");
  size_t covered = 0;
  for (size_t i = 0; i < b->header.segments.size(); ++i) {
    auto rows = std::as_const(*b).segment_rows(i);
    SY_FUZZ_CHECK(rows.data() == b->rows.data() + covered, "segment %zu does not follow the previous one", i);
    covered += rows.size();
  }
  SY_FUZZ_CHECK(covered == b->rows.size(), "segments cover %zu of %zu bytes", covered, b->rows.size());
}

void batch_round_trip(byte_reader& in) {
  batch_header h;
  const uint8_t flags = in.u8();
  h.batch_id = in.u64();
  h.epoch = in.u64();
  h.layer = in.u32();
  h.hidden = 1 + in.u8() % 48;
  h.dtype = flags & 1 ? wire_dtype::f32 : wire_dtype::bf16;
  const size_t nseg = 1 + (flags >> 1) % 8;
  for (size_t i = 0; i < nseg; ++i) h.segments.push_back({in.u32(), in.u32(), in.u32(), 1u + in.u8() % 8});
  auto made = make_batch(h);
  SY_FUZZ_CHECK(static_cast<bool>(made), "make_batch refused a small valid header: %s", describe(made.error()).c_str());
  auto& rows = made->rows;
  const std::string_view fill = in.rest();
  for (size_t i = 0; i < rows.size(); ++i)
    rows.data()[i] = fill.empty() ? std::byte{0} : static_cast<std::byte>(fill[i % fill.size()] ^ static_cast<char>(i / fill.size()));
  const bool as_reply = flags & 0x10;
  encoded_frame enc;
  request rq;
  reply rp;
  if (as_reply) {
    static_cast<token_batch&>(rp) = std::move(*made);
    enc = encode_reply(rp);
  } else {
    static_cast<token_batch&>(rq) = std::move(*made);
    enc = encode_request(rq);
  }
  const token_batch& sent = as_reply ? static_cast<const token_batch&>(rp) : rq;
  auto f = decode(enc.header, enc.payload.size());
  SY_FUZZ_CHECK(static_cast<bool>(f), "decode refused an encoded batch: %s", describe(f.error()).c_str());
  SY_FUZZ_CHECK(f->kind == (as_reply ? frame_kind::reply : frame_kind::request), "kind changed");
  auto got = decode_batch(enc.header, enc.payload);
  SY_FUZZ_CHECK(static_cast<bool>(got), "decode_batch refused an encoded batch: %s", describe(got.error()).c_str());
  const auto& g = got->header;
  SY_FUZZ_CHECK(g.batch_id == h.batch_id && g.epoch == h.epoch && g.layer == h.layer && g.hidden == h.hidden &&
                    g.dtype == h.dtype && g.segments == h.segments,
                "the header changed in a round trip");
  SY_FUZZ_CHECK(!check_reply(sent.header, g), "a batch does not answer itself: %s", describe(check_reply(sent.header, g)).c_str());
  SY_FUZZ_CHECK(got->rows.size() == sent.rows.size() && std::memcmp(got->rows.data(), sent.rows.data(), sent.rows.size()) == 0,
                "the rows changed in a round trip");
  // Through f32 and back: f32 rows are kept bit for bit, bf16 rows too except that NaNs stay NaNs.
  std::vector<float> f32(g.total_rows() * g.hidden);
  SY_FUZZ_CHECK(!rows_to_f32(*got, f32), "rows_to_f32 refused a decoded batch");
  auto back = make_batch(g, f32);
  SY_FUZZ_CHECK(static_cast<bool>(back), "make_batch(header, f32) refused its own rows");
  const size_t eb = dtype_bytes(g.dtype);
  for (size_t i = 0; i < f32.size(); ++i) {
    if (std::isnan(f32[i])) {
      float v;
      if (g.dtype == wire_dtype::f32) {
        std::memcpy(&v, back->rows.data() + i * 4, 4);
      } else {
        uint16_t b16;
        std::memcpy(&b16, back->rows.data() + i * 2, 2);
        const uint32_t bits = static_cast<uint32_t>(b16) << 16;
        std::memcpy(&v, &bits, 4);
      }
      SY_FUZZ_CHECK(std::isnan(v), "a NaN row element did not stay NaN");
      continue;
    }
    SY_FUZZ_CHECK(std::memcmp(back->rows.data() + i * eb, got->rows.data() + i * eb, eb) == 0,
                  "element %zu changed through f32", i);
  }
}

void error_round_trip(byte_reader& in) {
  const uint8_t code = in.u8();
  const uint64_t category = in.u64();
  const uint64_t batch = in.u64();
  const uint32_t layer = in.u32();
  const std::string msg(in.bytes(1100));
  const caf::error err(code, static_cast<caf::atom_value>(category), caf::make_message(msg));
  auto bytes = encode_error(batch, 7, layer, err);
  auto f = decode(bytes, 0);
  SY_FUZZ_CHECK(static_cast<bool>(f), "decode refused an encoded error frame: %s", describe(f.error()).c_str());
  SY_FUZZ_CHECK(f->kind == frame_kind::error && f->header.batch_id == batch && f->header.epoch == 7 && f->header.layer == layer,
                "an error frame's ids changed");
  if (code == 0) {
    SY_FUZZ_CHECK(wire_code(f->error) == wire_errc::handler_failed, "an error frame without a code decoded as %s",
                  describe(f->error).c_str());
    return;
  }
  SY_FUZZ_CHECK(f->error.code() == code && f->error.category() == static_cast<caf::atom_value>(category),
                "an error's code or category changed");
  const std::string got = describe(f->error);
  SY_FUZZ_CHECK(got.size() <= wire_max_error_message, "an error message of %zu bytes", got.size());
  SY_FUZZ_CHECK(msg.compare(0, got.size(), got) == 0, "an error message changed (not a prefix)");
  if (msg.size() <= wire_max_error_message) SY_FUZZ_CHECK(got == msg, "an error message short enough was cut");
  if (sy::fuzz::valid_utf8(msg)) SY_FUZZ_CHECK(sy::fuzz::valid_utf8(got), "cutting a UTF-8 message split a character");
  // A frame decoded from an error frame encodes to the same bytes.
  auto again = encode_error(batch, 7, layer, f->error);
  SY_FUZZ_CHECK(again == bytes, "an error frame does not re-encode to the same bytes");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  byte_reader in(data, size);
  switch (in.u8() % 4) {
    case 0: {
      const std::string_view header = in.rest();
      decoded_checks(header, declared_payload(header), wire_limits{});
      break;
    }
    case 1: {
      const uint64_t payload = in.u64();
      const std::string_view header = in.rest();
      decoded_checks(header, payload, wire_limits{4, 64, 4096});
      break;
    }
    case 2: batch_round_trip(in); break;
    case 3: error_round_trip(in); break;
  }
  return 0;
}
