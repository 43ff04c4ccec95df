#pragma once
// Helpers shared by the transport tests: batches with seeded random rows, the "negate" handler used
// by servers in and out of process, and a child process running a UCX server.
#include "transport/link.hpp"
#include "transport/wire.hpp"

#include <chrono>
#include <cstdint>
#include <string>
#include <sys/types.h>
#include <vector>

namespace sy::transport::test {

/// Layer number that makes the test handler block until released (or until its process dies).
inline constexpr uint32_t blocking_layer = 999;

/// A request of `rows_per_segment.size()` segments (experts 0, 1, …) with seeded random rows.
request make_request(uint64_t batch_id, std::vector<uint32_t> rows_per_segment, uint32_t hidden = 64,
                     wire_dtype dtype = wire_dtype::bf16, uint32_t seed = 1);

/// The handler's reply: the request's rows with every element's sign flipped (exact in any dtype).
reply negate(request req);

/// True if `rep` holds `req`'s rows negated.
bool is_negation_of(const request& req, const reply& rep);

/// A request's bytes, kept before the request is moved into a link (for comparing the reply).
request clone(const request& r);

/// A UCX server in a child process (fork + exec of this test binary). Its handler negates; for
/// requests of `blocking_layer` it first writes 'B' to the status pipe and then blocks forever.
struct child_server {
  pid_t pid = -1;
  uint16_t port = 0;
  int status_fd = -1;   // child → parent: port, then one 'B' per blocking request
  int control_fd = -1;  // parent → child: closing it stops the child

  /// Starts the child and waits (poll, bounded) until it reports its bound port.
  static child_server start(bool peer_error_handling = true);
  /// Waits up to `timeout` for one byte `what` from the child.
  bool wait_for(char what, std::chrono::milliseconds timeout) const;
  /// Closes the control pipe and reaps the child; returns its exit status (or -1).
  int stop();
  void kill_now();
};

/// Entry point of the child process (called from main on "--child-server").
int child_server_main(int argc, char** argv);

/// Entry point on "--child-throwing-callback": a reply callback throws while a call_sync caller
/// drives the runtime. The process is expected to end by abort (std::terminate); it exits with 5
/// if the exception reached the caller instead, and with 0 if nothing happened at all.
int throwing_callback_main();

}  // namespace sy::transport::test
