#pragma once
/// The data-plane link interface: a client sends request frames to one peer and gets each reply (or
/// a typed error) back asynchronously; a server answers requests through a handler. Two
/// implementations: `inproc_link.hpp` (same process, no copies) and `ucx_link.hpp` (UCX active
/// messages between processes or hosts).
///
/// Guarantees common to both:
/// - `send`'s callback runs exactly once: with the reply, with the error the server's handler
///   returned (carried unchanged, any layer's code), or with a link error: `timeout`,
///   `peer_failed`, `link_closed`, `duplicate_batch`, a validation error, ...
/// - A reply reaches the caller only if it answers the request: same batch id, dtype, hidden size
///   and segments (else `dtype_mismatch` / `segment_mismatch`).
/// - Batch ids identify a request on its link while it is pending; a second pending request with the
///   same id fails at once with `duplicate_batch`. A reply arriving after its request timed out is
///   dropped and counted (`late_replies`).
/// - Nothing on the request path throws.
#include "transport/error.hpp"
#include "transport/wire.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>

namespace sy::transport {

/// A snapshot of one link's counters (or of a server's, summed over its connections).
struct link_stats {
  uint64_t requests_sent = 0;      ///< client: requests handed to the transport
  uint64_t replies_received = 0;   ///< client: replies delivered to callers (error frames not included)
  uint64_t errors_received = 0;    ///< client: error frames from the server
  uint64_t late_replies = 0;       ///< client: replies whose request had already completed (timeout)
  uint64_t requests_received = 0;  ///< server: valid requests passed to the handler
  uint64_t replies_sent = 0;       ///< server: replies sent
  uint64_t errors_sent = 0;        ///< server: error frames sent
  uint64_t bytes_sent = 0;         ///< header + payload bytes
  uint64_t bytes_received = 0;     ///< header + payload bytes
  uint64_t links_closed = 0;       ///< client: 1 once closed; server: connections closed so far
  std::array<uint64_t, wire_errc_count> errors{};  ///< errors seen, by reason

  [[nodiscard]] uint64_t error_count(wire_errc code) const { return errors[static_cast<size_t>(code)]; }
  [[nodiscard]] uint64_t errors_total() const;
  link_stats& operator+=(const link_stats& other);
};

/// Receives a request's outcome. Runs on the link's thread (see each implementation): keep it short
/// and do not block in it. Must not throw: on the UCX link one that throws ends the process
/// (std::terminate), whichever thread was driving; see ucx_link.cpp, `pass`.
using reply_callback = std::function<void(caf::expected<reply>)>;

/// Computes the reply to a request. The link stamps the request's batch id, epoch and layer on the
/// reply, so the handler only fills segments, dtype, hidden size and rows; returning an error sends
/// an error frame carrying it. May run on a worker thread of the server; must not throw (return
/// an error instead: on the UCX link a handler that throws ends the process).
using request_handler = std::function<caf::expected<reply>(request)>;

/// The client end of a link to one server.
class link_client {
 public:
  virtual ~link_client() = default;

  /// Sends `req`; `on_reply` runs exactly once, at the latest about `timeout` after the call.
  /// Errors found before sending (invalid header, closed link, duplicate id) may run `on_reply` on
  /// the caller's thread before `send` returns.
  virtual void send(request req, std::chrono::milliseconds timeout, reply_callback on_reply) = 0;

  /// `send` with a future instead of a callback.
  [[nodiscard]] std::future<caf::expected<reply>> call(request req, std::chrono::milliseconds timeout);

  /// Sends `req` and blocks until its outcome. The default waits on `call`'s future; a link may
  /// instead do the work on the calling thread while it waits (the UCX link drives its runtime,
  /// saving two thread hand-offs per round trip). Must not be called from a reply callback.
  [[nodiscard]] virtual caf::expected<reply> call_sync(request req, std::chrono::milliseconds timeout);

  [[nodiscard]] virtual link_stats stats() const = 0;

  /// False once the link was closed or its peer failed; later sends fail with `link_closed`.
  [[nodiscard]] virtual bool is_open() const = 0;

  /// Fails every pending request with `link_closed` and closes the link. Idempotent; blocks until
  /// the link is closed. Must not be called from a reply callback of the same link.
  virtual void close() = 0;
};

/// The server end: answers every connection's requests through one handler.
class link_server {
 public:
  virtual ~link_server() = default;

  /// Counters summed over all connections, closed ones included.
  [[nodiscard]] virtual link_stats stats() const = 0;

  /// Connections open now.
  [[nodiscard]] virtual size_t connections() const = 0;

  /// Stops accepting, closes every connection, waits for running handlers. Idempotent.
  virtual void stop() = 0;
};

}  // namespace sy::transport
