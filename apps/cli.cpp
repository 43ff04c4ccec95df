#include "apps/cli.hpp"

#include "model/error.hpp"
#include "model/tokenizer.hpp"

#include <filesystem>

#include <spdlog/spdlog.h>

#include <cstdlib>

#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <thread>

namespace sy::apps {

namespace {
std::atomic<bool> stop_requested{false};
}

void fail(const std::string& msg) {
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  throw CLI::RuntimeError(1);
}

std::pair<std::string, uint16_t> parse_host_port(const std::string& s, const char* flag) {
  const auto colon = s.rfind(':');
  int port = -1;
  if (colon != std::string::npos) try {
      port = std::stoi(s.substr(colon + 1));
    } catch (const std::exception&) {
    }
  if (port < 0 || port > 65535) fail(std::string(flag) + ": expected HOST:PORT with a port in 0..65535, got '" + s + "'");
  return {s.substr(0, colon), static_cast<uint16_t>(port)};
}

void wait_for_stop_signal() {
  std::signal(SIGINT, [](int) { stop_requested = true; });
  std::signal(SIGTERM, [](int) { stop_requested = true; });
  while (!stop_requested) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

std::string admin_token_from_env() {
  const char* t = std::getenv("SWITCHYARD_ADMIN_TOKEN");
  if (t && *t) return t;
  spdlog::warn("admin routes (/admin/*) are closed: set SWITCHYARD_ADMIN_TOKEN to a secret to open them");
  return {};
}

std::shared_ptr<const model::tokenizer> load_serving_tokenizer(const std::string& path, const std::string& model_dir) {
  std::filesystem::path p = path;
  if (p.empty()) {
    p = std::filesystem::path(model_dir) / "tokenizer.json";
    if (!std::filesystem::exists(p)) {
      spdlog::warn("no tokenizer.json in {}: prompts must be token ids (--tokenizer FILE adds one)", model_dir);
      return nullptr;
    }
  }
  auto t = model::tokenizer::load(p);
  if (!t) fail("--tokenizer: " + model::describe(t.error()));
  return std::make_shared<const model::tokenizer>(std::move(*t));
}

}  // namespace sy::apps
