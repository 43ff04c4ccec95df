#include "transport/error.hpp"

#include <caf/atom.hpp>
#include <caf/make_message.hpp>
#include <caf/message.hpp>

namespace sy::transport {

caf::error make_error(wire_errc code, std::string message) {
  return caf::error(static_cast<uint8_t>(code), caf::atom("wire"), caf::make_message(std::move(message)));
}

std::string describe(const caf::error& err) {
  if (!err) return "no error";
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0)) return ctx.get_as<std::string>(0);
  return to_string(err);
}

wire_errc wire_code(const caf::error& err) {
  if (!err || err.category() != caf::atom("wire") || err.code() >= wire_errc_count) return wire_errc::none;
  return static_cast<wire_errc>(err.code());
}

const char* to_string(wire_errc code) {
  switch (code) {
    case wire_errc::none: return "none";
    case wire_errc::truncated: return "truncated";
    case wire_errc::bad_magic: return "bad_magic";
    case wire_errc::bad_version: return "bad_version";
    case wire_errc::bad_kind: return "bad_kind";
    case wire_errc::bad_dtype: return "bad_dtype";
    case wire_errc::length_mismatch: return "length_mismatch";
    case wire_errc::too_many_segments: return "too_many_segments";
    case wire_errc::bad_shape: return "bad_shape";
    case wire_errc::too_large: return "too_large";
    case wire_errc::unknown_expert: return "unknown_expert";
    case wire_errc::unknown_slot: return "unknown_slot";
    case wire_errc::version_mismatch: return "version_mismatch";
    case wire_errc::dtype_mismatch: return "dtype_mismatch";
    case wire_errc::segment_mismatch: return "segment_mismatch";
    case wire_errc::timeout: return "timeout";
    case wire_errc::peer_failed: return "peer_failed";
    case wire_errc::link_closed: return "link_closed";
    case wire_errc::connect_failed: return "connect_failed";
    case wire_errc::duplicate_batch: return "duplicate_batch";
    case wire_errc::send_failed: return "send_failed";
    case wire_errc::handler_failed: return "handler_failed";
    case wire_errc::out_of_memory: return "out_of_memory";
    case wire_errc::invalid_argument: return "invalid_argument";
    case wire_errc::ucx_error: return "ucx_error";
  }
  return "unknown";
}

}  // namespace sy::transport
