#pragma once
/// The in-process link: the same interface as the UCX link for the embedded cluster and tests.
///
/// A request is moved from `send` into the handler and the reply moved back into the callback: the
/// rows are never copied or encoded. The request header gets the same validation a UCX server
/// applies after decoding (`validate` with the server's limits) and the reply the same check a UCX
/// client applies (`check_reply`), so both links report the same typed errors. An invalid request
/// fails only that request (there is no byte stream to resynchronise, so nothing is closed).
///
/// Threads: with `workers >= 1` the handler runs on the server's pool and the callback runs on the
/// pool thread that finished the handler, or on the server's timer thread for a timeout. With
/// `workers == 0` the handler and the callback run on the caller's thread inside `send` (the timeout
/// cannot interrupt the handler then: a reply that took longer than the timeout is reported as
/// `timeout`). Errors found before dispatch run the callback on the caller's thread.
#include "transport/link.hpp"

#include <memory>

namespace sy::transport {

struct inproc_options {
  /// Threads running the handler; 0 runs it on the caller's thread.
  unsigned workers = 1;
  wire_limits limits;
};

class inproc_server final : public link_server {
 public:
  [[nodiscard]] static caf::expected<std::unique_ptr<inproc_server>> make(request_handler handler,
                                                                          inproc_options options = {});
  ~inproc_server() override;

  /// A new client link to this server. The link may outlive the server; after `stop` its sends
  /// fail with `link_closed`.
  [[nodiscard]] std::unique_ptr<link_client> connect();

  [[nodiscard]] link_stats stats() const override;
  [[nodiscard]] size_t connections() const override;
  void stop() override;

  struct state;

 private:
  explicit inproc_server(std::shared_ptr<state> s) : state_(std::move(s)) {}
  std::shared_ptr<state> state_;
};

}  // namespace sy::transport
