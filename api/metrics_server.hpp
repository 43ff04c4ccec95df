#pragma once
/// A small HTTP listener (Boost.Beast) for the processes without an HTTP API — the coordinator and
/// the expert hosts: `GET /metrics` (the process's registry, Prometheus text format) and
/// `GET /healthz`. One I/O thread; Beast stays inside metrics_server.cpp.
#include <caf/expected.hpp>

#include <cstdint>
#include <memory>
#include <string>

namespace sy::api {

class metrics_server {
 public:
  /// Listens on host:port (port 0 = any free port); `flag` names the option in errors.
  static caf::expected<std::unique_ptr<metrics_server>> start(const std::string& host, uint16_t port,
                                                              const std::string& flag = "--metrics");
  ~metrics_server();
  [[nodiscard]] uint16_t port() const;
  /// Stops accepting and joins the I/O thread. Idempotent.
  void stop();

  struct impl;

 private:
  explicit metrics_server(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace sy::api
