#pragma once
/// Errors of the transport layer. Every fallible function of `sy::transport` returns
/// `caf::expected<T>` or `caf::error` whose code is a `wire_errc` (category atom "wire") and whose
/// context is one human-readable message. `describe()` renders any layer's error the same way.
///
/// An error frame carries a `caf::error` of any layer across a link unchanged (code, category and
/// message), so a host that refuses a batch with `wire_errc::unknown_expert` is seen by the client as
/// exactly that error.
#include <caf/error.hpp>
#include <caf/expected.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace sy::transport {

enum class wire_errc : uint8_t {
  none = 0,
  // Frame validation (decode): the bytes on the wire are wrong.
  truncated,          ///< a header shorter than its fixed part or than its own fields require
  bad_magic,          ///< not a Switchyard frame
  bad_version,        ///< a wire version this build does not speak
  bad_kind,           ///< kind is not request / reply / error, or not the kind expected here
  bad_dtype,          ///< dtype code unknown, or given on an error frame
  length_mismatch,    ///< declared lengths disagree with the bytes received
  too_many_segments,  ///< segment count above the bound
  bad_shape,          ///< zero or oversized hidden size, empty batch, a segment of zero rows
  too_large,          ///< payload above the size bound
  // Receiver-side checks: a well-formed frame asks for something this host does not hold.
  unknown_expert,     ///< no slot on this host holds (layer, expert)
  unknown_slot,       ///< the slot named is not held, or holds another expert
  version_mismatch,   ///< the slot holds another weight version
  dtype_mismatch,     ///< a reply in another dtype than its request
  segment_mismatch,   ///< a reply whose segments differ from its request's, or wrong hidden size
  // Link failures.
  timeout,            ///< no reply within the deadline
  peer_failed,        ///< the endpoint failed (peer crashed, connection reset)
  link_closed,        ///< the link was closed (locally, by the peer, or after a malformed frame)
  connect_failed,     ///< the peer could not be reached when the link was made
  duplicate_batch,    ///< a batch id already pending on this link
  send_failed,        ///< the transport refused to send
  handler_failed,     ///< the server's handler returned an invalid reply
  out_of_memory,      ///< a buffer for rows could not be allocated
  invalid_argument,   ///< a caller passed something inconsistent (bad address, options)
  ucx_error,          ///< UCX failed to initialise or to set up a listener
};

/// Number of codes, for per-reason counters indexed by `static_cast<size_t>(code)`.
inline constexpr size_t wire_errc_count = static_cast<size_t>(wire_errc::ucx_error) + 1;

/// Builds an error of the "wire" category carrying `message`.
[[nodiscard]] caf::error make_error(wire_errc code, std::string message);

/// Returns the message of an error built by any layer's `make_error`, or CAF's rendering otherwise.
[[nodiscard]] std::string describe(const caf::error& err);

/// Returns the name of a code ("bad_magic", ...).
[[nodiscard]] const char* to_string(wire_errc code);

/// The `wire_errc` of `err`, or `none` when `err` is empty or of another category.
[[nodiscard]] wire_errc wire_code(const caf::error& err);

}  // namespace sy::transport
