#include "test_util.hpp"

#include "model/error.hpp"
#include "transport/wire.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

using namespace sy::transport;

namespace {

void set_u8(std::vector<std::byte>& h, size_t off, uint8_t v) { h[off] = std::byte{v}; }
void set_u16(std::vector<std::byte>& h, size_t off, uint16_t v) {
  for (int i = 0; i < 2; ++i) h[off + i] = std::byte(static_cast<uint8_t>(v >> (8 * i)));
}
void set_u32(std::vector<std::byte>& h, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) h[off + i] = std::byte(static_cast<uint8_t>(v >> (8 * i)));
}

/// A valid request header: 2 segments (3 and 5 rows), hidden 8, bf16 → payload 128 bytes.
batch_header sample_header() {
  batch_header h;
  h.batch_id = 42;
  h.epoch = 9;
  h.layer = 4;
  h.hidden = 8;
  h.dtype = wire_dtype::bf16;
  h.segments = {{1, 10, 2, 3}, {6, 11, 1, 5}};
  return h;
}

constexpr uint64_t sample_payload = (3 + 5) * 8 * 2;

struct malformed_case {
  const char* name;
  wire_errc expected;
  std::function<void(std::vector<std::byte>&, uint64_t&)> mutate;
};

}  // namespace

TEST_CASE("wire: a request frame round-trips through encode and decode", "[transport][wire]") {
  auto req = test::make_request(77, {2, 1, 4}, 16, wire_dtype::bf16, 5);
  auto frame = encode_request(req);
  CHECK(frame.header.size() == wire_fixed_bytes + 3 * wire_segment_bytes);
  CHECK(frame.payload.data() == req.rows.data());  // the payload is a view, not a copy
  auto back = decode_batch(frame.header, frame.payload);
  REQUIRE(back);
  CHECK(back->header.batch_id == 77);
  CHECK(back->header.epoch == req.header.epoch);
  CHECK(back->header.layer == req.header.layer);
  CHECK(back->header.hidden == 16);
  CHECK(back->header.segments == req.header.segments);
  REQUIRE(back->rows.size() == req.rows.size());
  CHECK(std::memcmp(back->rows.data(), req.rows.data(), req.rows.size()) == 0);
  CHECK(back->segment_rows(1).size() == 1 * 16 * 2);
  CHECK(back->segment_rows(2).data() == back->rows.data() + 3 * 16 * 2);

  auto rep = test::negate(std::move(req));
  auto rf = encode_reply(rep);
  auto d = decode(rf.header, rf.payload.size());
  REQUIRE(d);
  CHECK(d->kind == frame_kind::reply);
}

TEST_CASE("wire: encoding a header into a caller's buffer gives the same bytes", "[transport][wire]") {
  for (size_t segments : {size_t{1}, size_t{8}, size_t{13}}) {
    auto req = test::make_request(7, std::vector<uint32_t>(segments, 3), 64, wire_dtype::bf16, 11);
    const auto want = encode_header(frame_kind::request, req.header);
    std::vector<std::byte> got(req.header.header_bytes(), std::byte{0xAB});
    encode_header_into(frame_kind::request, req.header, got);
    CHECK(got == want);
  }
}

TEST_CASE("wire: an error frame carries any layer's code, category and message", "[transport][wire]") {
  for (const auto& err : {make_error(wire_errc::unknown_expert, "host: layer 3 expert 9 is not held here"),
                          sy::model::make_error(sy::model::model_errc::bad_value, "model: rows are NaN")}) {
    auto h = encode_error(5, 6, 7, err);
    auto d = decode(h, 0);
    REQUIRE(d);
    CHECK(d->kind == frame_kind::error);
    CHECK(d->header.batch_id == 5);
    CHECK(d->header.epoch == 6);
    CHECK(d->header.layer == 7);
    CHECK(d->error.code() == err.code());
    CHECK(d->error.category() == err.category());
    CHECK(describe(d->error) == describe(err));
  }
  // Long messages are cut to the bound, and still decode.
  auto h = encode_error(1, 1, 1, make_error(wire_errc::handler_failed, std::string(5000, 'x')));
  auto d = decode(h, 0);
  REQUIRE(d);
  CHECK(describe(d->error).size() == wire_max_error_message);
}

TEST_CASE("wire: every malformed frame class is rejected with its typed error", "[transport][wire]") {
  const std::vector<malformed_case> cases = {
      {"shorter than the fixed part", wire_errc::truncated, [](auto& h, auto&) { h.resize(39); }},
      {"empty header", wire_errc::truncated, [](auto& h, auto&) { h.clear(); }},
      {"declared length beyond the bytes", wire_errc::truncated, [](auto& h, auto&) { h.resize(h.size() - 16); }},
      {"trailing bytes", wire_errc::length_mismatch, [](auto& h, auto&) {
         h.resize(h.size() + 4);
       }},
      {"bad magic", wire_errc::bad_magic, [](auto& h, auto&) { set_u8(h, 0, 0x00); }},
      {"bad version", wire_errc::bad_version, [](auto& h, auto&) { set_u16(h, 4, 2); }},
      {"version zero", wire_errc::bad_version, [](auto& h, auto&) { set_u16(h, 4, 0); }},
      {"kind zero", wire_errc::bad_kind, [](auto& h, auto&) { set_u8(h, 6, 0); }},
      {"kind four", wire_errc::bad_kind, [](auto& h, auto&) { set_u8(h, 6, 4); }},
      {"dtype zero", wire_errc::bad_dtype, [](auto& h, auto&) { set_u8(h, 7, 0); }},
      {"dtype unknown", wire_errc::bad_dtype, [](auto& h, auto&) { set_u8(h, 7, 9); }},
      {"payload one byte short", wire_errc::length_mismatch, [](auto&, auto& p) { p -= 1; }},
      {"payload one byte long", wire_errc::length_mismatch, [](auto&, auto& p) { p += 1; }},
      {"f32 rows in a bf16-sized payload", wire_errc::length_mismatch, [](auto& h, auto&) { set_u8(h, 7, 2); }},
      {"segment count above the header", wire_errc::length_mismatch, [](auto& h, auto&) { set_u32(h, 32, 3); }},
      {"segment count below the header", wire_errc::length_mismatch, [](auto& h, auto&) { set_u32(h, 32, 1); }},
      {"segment count above the bound", wire_errc::too_many_segments, [](auto& h, auto&) { set_u32(h, 32, 257); }},
      {"segment count 2^32-1", wire_errc::too_many_segments,
       [](auto& h, auto&) { set_u32(h, 32, 0xffffffffu); }},
      {"no segments", wire_errc::bad_shape, [](auto& h, auto& p) {
         set_u32(h, 32, 0);
         h.resize(wire_fixed_bytes);
         set_u32(h, 36, wire_fixed_bytes);
         p = 0;
       }},
      {"hidden zero", wire_errc::bad_shape, [](auto& h, auto&) { set_u32(h, 28, 0); }},
      {"hidden above the bound", wire_errc::bad_shape, [](auto& h, auto&) { set_u32(h, 28, 65537); }},
      {"segment with zero rows", wire_errc::bad_shape, [](auto& h, auto&) { set_u32(h, 40 + 12, 0); }},
      {"rows × hidden beyond the payload bound", wire_errc::too_large, [](auto& h, auto&) {
         set_u32(h, 40 + 12, 0xffffffffu);
         set_u32(h, 28, 65536);
       }},
      {"more rows than the payload", wire_errc::length_mismatch, [](auto& h, auto&) { set_u32(h, 40 + 12, 4); }},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto h = encode_header(frame_kind::request, sample_header());
    uint64_t payload = sample_payload;
    REQUIRE(decode(h, payload));  // the unmutated frame is valid
    c.mutate(h, payload);
    auto d = decode(h, payload);
    REQUIRE_FALSE(d);
    CHECK(to_string(wire_code(d.error())) == std::string(to_string(c.expected)));
    CHECK_FALSE(describe(d.error()).empty());
  }
}

TEST_CASE("wire: malformed error frames are rejected with typed errors", "[transport][wire]") {
  const auto base = encode_error(1, 2, 3, make_error(wire_errc::unknown_slot, "slot 4"));
  const std::vector<malformed_case> cases = {
      {"error frame with a dtype", wire_errc::bad_dtype, [](auto& h, auto&) { set_u8(h, 7, 1); }},
      {"error frame with segments", wire_errc::bad_shape, [](auto& h, auto&) { set_u32(h, 32, 1); }},
      {"error frame with a payload", wire_errc::length_mismatch, [](auto&, auto& p) { p = 16; }},
      {"error frame without its fixed part", wire_errc::truncated, [](auto& h, auto&) {
         h.resize(wire_fixed_bytes + 4);
         set_u32(h, 36, static_cast<uint32_t>(h.size()));
       }},
      {"message longer than the frame", wire_errc::length_mismatch,
       [](auto& h, auto&) { set_u16(h, wire_fixed_bytes + 10, 200); }},
      {"message above the bound", wire_errc::length_mismatch,
       [](auto& h, auto&) { set_u16(h, wire_fixed_bytes + 10, 5000); }},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto h = base;
    uint64_t payload = 0;
    c.mutate(h, payload);
    auto d = decode(h, payload);
    REQUIRE_FALSE(d);
    CHECK(to_string(wire_code(d.error())) == std::string(to_string(c.expected)));
  }
}

TEST_CASE("wire: overflowing rows × hidden × dtype is caught, not wrapped", "[transport][wire]") {
  wire_limits huge{256, 0xffffffffu, std::numeric_limits<uint64_t>::max()};
  batch_header h = sample_header();
  h.dtype = wire_dtype::f32;
  h.hidden = 0xffffffffu;
  h.segments.assign(256, segment{1, 2, 3, 0xffffffffu});
  auto bytes = encode_header(frame_kind::request, h);
  // 256 × (2³²−1) rows × (2³²−1) × 4 wraps a u64; a wrapped product could equal a small payload.
  auto d = decode(bytes, 0, huge);
  REQUIRE_FALSE(d);
  CHECK(wire_code(d.error()) == wire_errc::too_large);
}

TEST_CASE("wire: check_rows applies no limits but still matches the rows to the header", "[transport][wire]") {
  batch_header h = sample_header();
  CHECK_FALSE(check_rows(h, sample_payload));
  CHECK(wire_code(check_rows(h, sample_payload - 2)) == wire_errc::length_mismatch);
  CHECK(wire_code(check_rows(h, sample_payload + 2)) == wire_errc::length_mismatch);
  // Past the default receive limits (which a link configured otherwise may have let through).
  h.segments.assign(300, segment{1, 2, 3, 1});
  const uint64_t bytes = 300 * 8 * 2;
  CHECK(wire_code(validate(h, bytes)) == wire_errc::too_many_segments);
  CHECK_FALSE(check_rows(h, bytes));
  h.segments[7].rows = 0;  // shape errors are still errors
  CHECK(wire_code(check_rows(h, bytes)) == wire_errc::bad_shape);
}

TEST_CASE("wire: random corruption of headers never crashes and always yields a typed error or a frame",
          "[transport][wire]") {
  std::mt19937 rng(1234);
  const auto good = encode_header(frame_kind::request, sample_header());
  const auto good_err = encode_error(1, 2, 3, make_error(wire_errc::timeout, "late"));
  int rejected = 0;
  for (int i = 0; i < 20000; ++i) {
    auto h = (i % 2) ? good : good_err;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) h[rng() % h.size()] = std::byte(static_cast<uint8_t>(rng()));
    if (rng() % 8 == 0) h.resize(rng() % (h.size() + 1));
    uint64_t payload = (i % 2) ? sample_payload : 0;
    if (rng() % 8 == 0) payload = rng();
    auto d = decode(h, payload);
    if (!d) {
      ++rejected;
      CHECK(wire_code(d.error()) != wire_errc::none);
    }
  }
  CHECK(rejected > 10000);
}

TEST_CASE("wire: f32 rows become bf16 with round-to-nearest-even", "[transport][wire]") {
  const float one = 1.0f;
  const float half_ulp = std::ldexp(1.0f, -8);  // bf16 has 8 significant bits: ulp(1) = 2^-7
  std::vector<float> in = {one,
                           one + half_ulp,             // tie → even (1.0)
                           one + 3 * half_ulp,         // tie → even (1 + 2^-6)
                           one + half_ulp + 1e-6f,     // above the tie → up
                           -2.5f,
                           std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(),
                           0.0f};
  batch_header h;
  h.hidden = static_cast<uint32_t>(in.size());
  h.segments = {{0, 0, 0, 1}};
  auto b = make_batch(h, in);
  REQUIRE(b);
  CHECK(b->rows.size() == in.size() * 2);
  std::vector<float> out(in.size());
  REQUIRE_FALSE(rows_to_f32(*b, out));
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == 1.0f);
  CHECK(out[2] == one + 4 * half_ulp);
  CHECK(out[3] == one + 2 * half_ulp);
  CHECK(out[4] == -2.5f);
  CHECK(std::isinf(out[5]));
  CHECK(std::isnan(out[6]));
  CHECK(out[7] == 0.0f);

  h.dtype = wire_dtype::f32;
  auto f = make_batch(h, in);
  REQUIRE(f);
  REQUIRE_FALSE(rows_to_f32(*f, out));
  CHECK(out[3] == in[3]);  // f32 travels exactly

  auto wrong = make_batch(h, std::vector<float>(3));
  REQUIRE_FALSE(wrong);
  CHECK(wire_code(wrong.error()) == wire_errc::length_mismatch);
}

TEST_CASE("wire: the receiver's slot check names unknown experts, slots and versions", "[transport][wire]") {
  slot_inventory inv;
  inv.add({10, 4, 1, 2, 8});  // slot 10: layer 4 expert 1 v2, hidden 8
  inv.add({11, 4, 6, 1, 8});  // slot 11: layer 4 expert 6 v1
  CHECK_FALSE(inv.check(sample_header()));

  auto h = sample_header();
  h.segments[1].expert = 7;  // nobody holds expert 7
  CHECK(wire_code(inv.check(h)) == wire_errc::unknown_expert);
  h = sample_header();
  h.segments[0].slot = 11;  // expert 1 is held, but not in slot 11
  CHECK(wire_code(inv.check(h)) == wire_errc::unknown_slot);
  h = sample_header();
  h.segments[0].slot = 12;  // no such slot
  CHECK(wire_code(inv.check(h)) == wire_errc::unknown_slot);
  h = sample_header();
  h.segments[1].version = 2;
  CHECK(wire_code(inv.check(h)) == wire_errc::version_mismatch);
  h = sample_header();
  h.layer = 5;  // the slots hold layer 4
  CHECK(wire_code(inv.check(h)) == wire_errc::unknown_expert);
  h = sample_header();
  h.hidden = 16;
  CHECK(wire_code(inv.check(h)) == wire_errc::segment_mismatch);
  CHECK(inv.remove(11));
  CHECK(wire_code(inv.check(sample_header())) == wire_errc::unknown_expert);
}

TEST_CASE("wire: a reply must answer its request (dtype, hidden, segments, batch id)", "[transport][wire]") {
  const auto req = sample_header();
  auto rep = req;
  CHECK_FALSE(check_reply(req, rep));
  rep.dtype = wire_dtype::f32;
  CHECK(wire_code(check_reply(req, rep)) == wire_errc::dtype_mismatch);
  rep = req;
  rep.segments[1].rows = 4;
  CHECK(wire_code(check_reply(req, rep)) == wire_errc::segment_mismatch);
  rep = req;
  rep.hidden = 4;
  CHECK(wire_code(check_reply(req, rep)) == wire_errc::segment_mismatch);
  rep = req;
  rep.batch_id = 43;
  CHECK(wire_code(check_reply(req, rep)) == wire_errc::segment_mismatch);
}
