#pragma once
/// The UCX link: token batches as UCX active messages between processes (or hosts).
///
/// - One `ucx_runtime` per process holds the ucp context and worker. One thread at a time drives
///   the worker (every UCX call happens on the driving thread): the runtime's progress thread, or a
///   thread waiting in `ucx_client::call_sync`, while the progress thread steps aside. The progress
///   thread polls for a while after the last event (longer while replies are awaited), then sleeps
///   in epoll on the worker's event fd (UCP_FEATURE_WAKEUP) and its own eventfd.
/// - `ucx_server` listens on HOST:PORT with a `ucp_listener` (port 0 picks a free port; `port()`
///   reports it) and answers requests through a handler on a worker pool (or on the driving thread
///   when `workers == 0`, for handlers that never block).
/// - `ucx_client` is one endpoint to one server, created from the server's address. Replies are
///   matched to requests by batch id; callbacks run on the driving thread.
/// - A frame's header travels in the AM header, its rows in the AM payload; UCX picks eager or
///   rendezvous (the rendezvous case is received with ucp_am_recv_data_nbx straight into the
///   batch's buffer, allocated only after the header was validated).
///
/// Failure handling:
/// - `peer_error_handling` (default on) sets UCP_ERR_HANDLING_MODE_PEER on the endpoint: a crashed
///   peer or a reset connection fails every request pending on that link at once with
///   `peer_failed`. In UCX 1.13 this mode disables the shared-memory transports (only TCP remains),
///   so a same-host link may turn it off for bandwidth and rely on timeouts and the control plane's
///   heartbeat instead. Both ends of a link must use the same setting.
/// - A malformed frame (any `decode` error, an unexpected kind) closes only the connection it came
///   on; it is counted under its reason and the server keeps serving the others.
/// - Timeouts are enforced by the driving thread; a reply that arrives later is dropped and counted.
#include "transport/link.hpp"

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sy::transport {

struct ucx_runtime_options {
  /// UCX configuration overrides applied on top of the environment, e.g. {"TLS", "tcp"}. Keep
  /// `tcp` among the transports: the listener's connection setup runs over it.
  std::vector<std::pair<std::string, std::string>> config;
  /// How long the progress thread keeps polling after the last event before it sleeps in epoll.
  /// Polling answers the next message in microseconds instead of a wake-up's tens; it costs a
  /// core while it lasts.
  std::chrono::microseconds spin{50};
  /// How long it keeps polling after the last event while it awaits something: a reply to a
  /// request of this process, or a handler's reply to send.
  std::chrono::microseconds spin_awaiting{1000};
  /// Bounds applied to every frame this process receives.
  wire_limits limits;
};

/// The process's UCX context, worker and progress thread. Links and servers keep it alive.
class ucx_runtime {
 public:
  [[nodiscard]] static caf::expected<std::shared_ptr<ucx_runtime>> make(ucx_runtime_options options = {});
  ~ucx_runtime();
  ucx_runtime(const ucx_runtime&) = delete;
  ucx_runtime& operator=(const ucx_runtime&) = delete;

  /// The largest AM header the worker accepts (bounds the segment count a link can send).
  [[nodiscard]] size_t max_am_header() const;
  /// Frames that arrived without a reply endpoint or for an unknown endpoint, and were dropped.
  [[nodiscard]] uint64_t unattributed_frames() const;

  struct impl;

 private:
  friend class ucx_client;
  friend class ucx_server;
  explicit ucx_runtime(std::shared_ptr<impl> i) : impl_(std::move(i)) {}
  std::shared_ptr<impl> impl_;
};

struct ucx_client_options {
  /// UCP_ERR_HANDLING_MODE_PEER on the endpoint (see the file comment). Must match the server's.
  bool peer_error_handling = true;
  /// `make` fails with `connect_failed` if the connection is not up within this time.
  std::chrono::milliseconds connect_timeout{2000};
};

/// One link to one server. Reply callbacks run on the thread driving the runtime: its progress
/// thread, or a thread waiting in `call_sync`.
class ucx_client final : public link_client {
 public:
  /// Connects to `host:port` and waits until the endpoint is wired up (a flush completes).
  [[nodiscard]] static caf::expected<std::unique_ptr<ucx_client>> make(std::shared_ptr<ucx_runtime> runtime,
                                                                       const std::string& host, uint16_t port,
                                                                       ucx_client_options options = {});
  ~ucx_client() override;

  void send(request req, std::chrono::milliseconds timeout, reply_callback on_reply) override;
  /// Sends and waits, driving the runtime's worker from this thread while no other thread does
  /// (the progress thread steps aside): the send and the reply need no thread hand-off. After
  /// `spin_awaiting` without an event it hands the worker back and sleeps until the outcome.
  /// Callbacks of other requests may run on this thread meanwhile.
  [[nodiscard]] caf::expected<reply> call_sync(request req, std::chrono::milliseconds timeout) override;
  [[nodiscard]] link_stats stats() const override;
  [[nodiscard]] bool is_open() const override;
  void close() override;

  struct state;

 private:
  ucx_client(std::shared_ptr<ucx_runtime> rt, std::shared_ptr<state> s) : runtime_(std::move(rt)), state_(std::move(s)) {}
  std::shared_ptr<ucx_runtime> runtime_;
  std::shared_ptr<state> state_;
};

struct ucx_server_options {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  ///< 0: pick a free port
  /// UCP_ERR_HANDLING_MODE_PEER on accepted endpoints. Must match the clients'.
  bool peer_error_handling = true;
  /// Handler threads; 0 runs the handler on the driving thread (only for handlers that never block).
  unsigned workers = 1;
};

class ucx_server final : public link_server {
 public:
  [[nodiscard]] static caf::expected<std::unique_ptr<ucx_server>> make(std::shared_ptr<ucx_runtime> runtime,
                                                                       request_handler handler,
                                                                       ucx_server_options options = {});
  ~ucx_server() override;

  /// The bound port.
  [[nodiscard]] uint16_t port() const;
  [[nodiscard]] link_stats stats() const override;
  /// Counters of each connection open now.
  [[nodiscard]] std::vector<link_stats> connection_stats() const;
  [[nodiscard]] size_t connections() const override;
  void stop() override;

  struct state;

 private:
  ucx_server(std::shared_ptr<ucx_runtime> rt, std::shared_ptr<state> s) : runtime_(std::move(rt)), state_(std::move(s)) {}
  std::shared_ptr<ucx_runtime> runtime_;
  std::shared_ptr<state> state_;
};

}  // namespace sy::transport
