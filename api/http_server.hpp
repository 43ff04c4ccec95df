#pragma once
/// The HTTP front (Boost.Beast): the OpenAI-style `POST /v1/completions` (text or token ids, n,
/// echo, stop, logprobs, streaming as server-sent events), `GET /v1/models`, vLLM's `POST
/// /tokenize` and `/detokenize`, `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus text
/// format), `GET /dashboard` (a self-contained page) with its data at `GET /dashboard/data`, and the
/// admin route `POST /admin/rebalance` (bearer token). Limits on bodies, headers, time and
/// connections; graceful drain. Beast stays inside http_server.cpp. Every response is counted in
/// `switchyard_http_requests_total{route,status}`.
#include "api/dashboard.hpp"
#include "scheduler/batcher.hpp"

#include <chrono>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace sy::model {
class tokenizer;
}

namespace sy::api {

struct http_config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;                ///< 0 = any free port (see `http_server::port`)
  int threads = 1;                  ///< I/O threads (the model runs on the engine thread)
  size_t max_body_bytes = 1 << 20;  ///< larger bodies get 413 (also when chunked)
  size_t max_header_bytes = 16 << 10;  ///< larger request heads get 431
  std::chrono::milliseconds header_timeout{10000};  ///< a request head must arrive within this (408)
  std::chrono::milliseconds body_timeout{30000};    ///< and its body within this once the head is in (408)
  std::chrono::milliseconds idle_timeout{60000};    ///< keep-alive connection with no request: closed
  int max_connections = 1024;       ///< beyond it a new connection gets 503 and is closed
  int64_t max_prompt_tokens = 0;    ///< per prompt (0 = only the context limit)
  int max_tokens = 1 << 20;         ///< largest max_tokens accepted
  int max_choices = 64;             ///< prompts × n per request
  /// Bearer token for /admin/* routes. Empty: the admin routes stay closed (401), never open.
  std::string admin_token;
  /// When set, the inference routes (completions, models, tokenize) need this bearer token too.
  std::string api_token;
};

/// What the HTTP front needs from the serving core.
struct completion_service {
  std::string model_name;
  int64_t vocab_size = 0;
  int64_t max_context = 0;                 ///< prompt + max_tokens must fit
  std::function<bool()> ready;             ///< every expert has a ready replica
  /// Text in and out (null: prompts are token ids and choices carry token ids only).
  std::shared_ptr<const model::tokenizer> tokenizer;
  std::function<caf::error(scheduler::generation_request)> submit;
  /// The router's view of the cluster for /dashboard/data (placement, hosts); optional.
  std::function<cluster_view()> cluster;
  /// POST /admin/rebalance: plans and applies a rebalancing round; the coordinator's JSON summary.
  /// Blocks until the round is over (called off the I/O threads). Unset: 501.
  std::function<caf::expected<std::string>()> rebalance;
  /// GET /admin/cluster: hosts, slots, state, the placement table and epoch, as JSON. Unset: 501.
  std::function<std::string()> cluster_state;
};

class http_server {
 public:
  static caf::expected<std::unique_ptr<http_server>> start(const http_config& cfg, completion_service svc);
  ~http_server();
  [[nodiscard]] uint16_t port() const;
  /// Graceful shutdown, first half: /readyz turns 503 and new requests are refused (503 +
  /// Retry-After); requests already accepted, streams included, go on.
  void drain();
  /// Completion requests accepted and not yet answered (or streams not yet ended).
  [[nodiscard]] int active_requests() const;
  /// Stops accepting and closes the I/O threads (requests in flight are dropped with the socket).
  void stop();

  struct impl;

 private:
  explicit http_server(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

/// Every route with whether it needs the admin token; a test checks each is one or the other.
struct route_info {
  const char* method;
  const char* path;
  bool admin;      ///< needs the admin token (closed without one)
  bool inference;  ///< needs the API token when one is configured
};
[[nodiscard]] const std::vector<route_info>& routes();

/// Equal strings, in time that does not depend on where they differ.
[[nodiscard]] bool constant_time_equal(const std::string& a, const std::string& b);

/// The error body every error response uses: {"error": {"type", "message", "param", "code"}}.
[[nodiscard]] std::string error_body(const std::string& type, const std::string& message, const std::string& param);

}  // namespace sy::api
