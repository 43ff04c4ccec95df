#pragma once
/// The HTTP front's options, shared by `serve` and `router`: one place that registers the flags,
/// builds the server's config and service, and runs the graceful shutdown.
#include "api/http_server.hpp"

#include <CLI/CLI.hpp>

#include <functional>
#include <memory>
#include <string>

namespace sy::apps {

struct http_options {
  std::string listen = "127.0.0.1:8080";
  std::string tokenizer;  ///< empty: the model folder's tokenizer.json, if any
  int max_connections = 1024;
  size_t max_body_bytes = 1 << 20;
  int header_timeout_ms = 10000;
  int64_t max_prompt_tokens = 0;
  int shutdown_grace_s = 30;
};

/// Registers --http, --tokenizer, --max-connections, --max-body-bytes, --header-timeout-ms,
/// --max-prompt-tokens and --shutdown-grace-s on `cmd`.
void add_http_options(CLI::App* cmd, http_options& o);

/// The server config from the options (the admin token from SWITCHYARD_ADMIN_TOKEN).
[[nodiscard]] api::http_config make_http_config(const http_options& o);

/// Blocks until SIGINT/SIGTERM, then shuts down gracefully: /readyz turns 503 and new requests are
/// refused at once, the accepted ones (streams included) finish, up to --shutdown-grace-s; then
/// returns (the caller stops the server and the cluster).
void serve_until_stopped(api::http_server& server, const std::function<void()>& drain, const std::function<bool()>& idle,
                         const http_options& o);

}  // namespace sy::apps
