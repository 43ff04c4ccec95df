// The cluster's processes: switchyard coordinator | expert-host | router.
#include "actors/roles.hpp"
#include "api/http_server.hpp"
#include "apps/commands.hpp"

#include <spdlog/spdlog.h>

#include <atomic>
#include <csignal>
#include <thread>

namespace sy::apps {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  throw CLI::RuntimeError(1);
}

std::atomic<bool> stop_flag{false};

void wait_for_signal() {
  std::signal(SIGINT, [](int) { stop_flag = true; });
  std::signal(SIGTERM, [](int) { stop_flag = true; });
  while (!stop_flag) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

std::pair<std::string, uint16_t> host_port(const std::string& s, const char* flag) {
  const auto colon = s.rfind(':');
  int port = -1;
  if (colon != std::string::npos) try {
      port = std::stoi(s.substr(colon + 1));
    } catch (const std::exception&) {
    }
  if (port < 0 || port > 65535) fail(std::string(flag) + ": expected HOST:PORT, got '" + s + "'");
  return {s.substr(0, colon), static_cast<uint16_t>(port)};
}

}  // namespace

void add_cluster_commands(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("coordinator", "Run the cluster's coordinator (membership, placement, epochs)");
    struct args {
      std::string listen = "127.0.0.1:0", model;
      int hosts = 1, replicas = 1;
    };
    auto a = std::make_shared<args>();
    cmd->add_option("--listen", a->listen, "Control-plane address HOST:PORT (port 0 = any)");
    cmd->add_option("--model", a->model, "Model folder")->required();
    cmd->add_option("--hosts", a->hosts, "Expert hosts to wait for before placing")->check(CLI::Range(1, 4096));
    cmd->add_option("--replicas", a->replicas, "Replicas per expert, on distinct hosts")->check(CLI::Range(1, 64));
    cmd->callback([a] {
      auto [host, port] = host_port(a->listen, "--listen");
      auto c = actors::coordinator_process::start({host, port, a->model, a->hosts, a->replicas});
      if (!c) fail(model::describe(c.error()));
      std::printf("coordinator listening on %s:%u\n", host.c_str(), static_cast<unsigned>((*c)->port()));
      std::fflush(stdout);
      wait_for_signal();
      (*c)->stop();
    });
  }
  {
    auto* cmd = app.add_subcommand("expert-host", "Run an expert host: holds experts, answers token batches over UCX");
    struct args {
      std::string coordinator, model, listen = "127.0.0.1:0", name;
      int slots = 0, threads = 0;
      bool no_peer_errors = false;
    };
    auto a = std::make_shared<args>();
    cmd->add_option("--coordinator", a->coordinator, "Coordinator HOST:PORT")->required();
    cmd->add_option("--model", a->model, "Model folder (shared filesystem or own copy)")->required();
    cmd->add_option("--slots", a->slots, "Experts this host can hold")->required()->check(CLI::Range(1, 1 << 20));
    cmd->add_option("--listen", a->listen, "Data-plane address HOST:PORT (port 0 = any)");
    cmd->add_option("--name", a->name, "Host name (default expert-host-PID)");
    cmd->add_option("--threads", a->threads, "Compute threads (0 = all cores)");
    cmd->add_flag("--no-peer-error-handling", a->no_peer_errors, "UCX without peer failure detection (allows shared memory)");
    cmd->callback([a] {
      auto [ch, cp] = host_port(a->coordinator, "--coordinator");
      auto [lh, lp] = host_port(a->listen, "--listen");
      actors::expert_host_options o;
      o.coordinator_host = ch;
      o.coordinator_port = cp;
      o.model = a->model;
      o.slots = a->slots;
      o.listen_host = lh;
      o.listen_port = lp;
      o.name = a->name;
      o.threads = a->threads;
      o.peer_error_handling = !a->no_peer_errors;
      auto h = actors::expert_host_process::start(o);
      if (!h) fail(model::describe(h.error()));
      std::printf("expert host serving token batches on %s:%u\n", lh.c_str(), static_cast<unsigned>((*h)->data_port()));
      std::fflush(stdout);
      wait_for_signal();
      (*h)->stop();
    });
  }
  {
    auto* cmd = app.add_subcommand("router", "Run a router: the dense model, gating, batching, and the HTTP API");
    struct args {
      std::string coordinator, model, http = "127.0.0.1:8080";
      int threads = 0, max_running = 64, max_queue = 256, budget = 512;
      bool bf16 = false, no_peer_errors = false;
    };
    auto a = std::make_shared<args>();
    cmd->add_option("--coordinator", a->coordinator, "Coordinator HOST:PORT")->required();
    cmd->add_option("--model", a->model, "Model folder")->required();
    cmd->add_option("--http", a->http, "HTTP listen address HOST:PORT (port 0 = any)");
    cmd->add_option("--threads", a->threads, "Compute threads (0 = all cores)");
    cmd->add_option("--max-running", a->max_running, "Sequences decoding at once")->check(CLI::Range(1, 1 << 16));
    cmd->add_option("--max-queue", a->max_queue, "Queued requests before 503")->check(CLI::Range(0, 1 << 20));
    cmd->add_option("--step-tokens", a->budget, "Tokens per engine step")->check(CLI::Range(1, 1 << 20));
    cmd->add_flag("--wire-bf16", a->bf16, "Send hidden rows as bf16 (half the bytes; answers then differ from local f32 in rounding)");
    cmd->add_flag("--no-peer-error-handling", a->no_peer_errors, "UCX without peer failure detection");
    cmd->callback([a] {
      auto [ch, cp] = host_port(a->coordinator, "--coordinator");
      auto [hh, hp] = host_port(a->http, "--http");
      actors::router_options o;
      o.coordinator_host = ch;
      o.coordinator_port = cp;
      o.model = a->model;
      o.threads = a->threads;
      o.batcher.max_running = a->max_running;
      o.batcher.max_queue = a->max_queue;
      o.batcher.step_token_budget = a->budget;
      o.wire_bf16 = a->bf16;
      o.peer_error_handling = !a->no_peer_errors;
      auto r = actors::router_process::start(o);
      if (!r) fail(model::describe(r.error()));
      auto* rp = r->get();
      api::http_config hc;
      hc.host = hh;
      hc.port = hp;
      api::completion_service svc;
      svc.model_name = std::filesystem::path(a->model).filename().string();
      svc.vocab_size = rp->config().vocab_size;
      svc.max_context = rp->config().max_position_embeddings;
      svc.ready = [rp] { return rp->ready(); };
      svc.submit = [rp](scheduler::generation_request req) { return rp->submit(std::move(req)); };
      auto server = api::http_server::start(hc, svc);
      if (!server) fail(model::describe(server.error()));
      std::printf("router serving HTTP on %s:%u\n", hh.c_str(), static_cast<unsigned>((*server)->port()));
      std::fflush(stdout);
      wait_for_signal();
      (*server)->stop();
      rp->stop();
    });
  }
}

}  // namespace sy::apps
