#include "apps/http_options.hpp"

#include "apps/cli.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <thread>

namespace sy::apps {

void add_http_options(CLI::App* cmd, http_options& o) {
  cmd->add_option("--http", o.listen, "HTTP listen address HOST:PORT (port 0 = any)");
  cmd->add_option("--tokenizer", o.tokenizer, "tokenizer.json (or a folder with one) for text prompts; default: the model's");
  cmd->add_option("--max-connections", o.max_connections, "Open HTTP connections before new ones get 503")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--max-body-bytes", o.max_body_bytes, "Largest request body (413 beyond)")->check(CLI::Range(size_t{64}, size_t{1} << 30));
  cmd->add_option("--header-timeout-ms", o.header_timeout_ms, "A request head must arrive within this (408)")->check(CLI::Range(100, 600000));
  cmd->add_option("--max-prompt-tokens", o.max_prompt_tokens, "Longest prompt accepted (0 = the context limit)")->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  cmd->add_option("--shutdown-grace-s", o.shutdown_grace_s, "On SIGTERM, how long accepted requests may run on")->check(CLI::Range(0, 86400));
}

api::http_config make_http_config(const http_options& o) {
  auto [host, port] = parse_host_port(o.listen, "--http");
  api::http_config hc;
  hc.host = host;
  hc.port = port;
  hc.max_connections = o.max_connections;
  hc.max_body_bytes = o.max_body_bytes;
  hc.header_timeout = std::chrono::milliseconds(o.header_timeout_ms);
  hc.max_prompt_tokens = o.max_prompt_tokens;
  hc.admin_token = admin_token_from_env();
  if (const char* t = std::getenv("SWITCHYARD_API_TOKEN"); t && *t) hc.api_token = t;
  return hc;
}

void serve_until_stopped(api::http_server& server, const std::function<void()>& drain, const std::function<bool()>& idle,
                         const http_options& o) {
  wait_for_stop_signal();
  server.drain();
  drain();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(o.shutdown_grace_s);
  std::fprintf(stderr, "draining: %d request(s) in flight (up to %d s)\n", server.active_requests(), o.shutdown_grace_s);
  while (std::chrono::steady_clock::now() < deadline && !(idle() && server.active_requests() == 0))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  // Let the last answers leave the socket buffers.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (server.active_requests() > 0)
    spdlog::warn("shutdown grace period over with {} request(s) still running; they fail", server.active_requests());
  std::fprintf(stderr, "shutting down\n");
}

}  // namespace sy::apps
