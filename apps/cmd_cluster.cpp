// The cluster's processes: switchyard coordinator | expert-host | router.
#include "actors/roles.hpp"
#include "api/http_server.hpp"
#include "api/metrics_server.hpp"
#include "apps/device.hpp"
#include "apps/cli.hpp"
#include "apps/http_options.hpp"
#include "apps/commands.hpp"
#include "apps/observe.hpp"

#include <chrono>

#include <spdlog/spdlog.h>
#include <toml++/toml.h>

#include <algorithm>
#include <optional>
#include <atomic>
#include <csignal>
#include <thread>

namespace sy::apps {

namespace {

/// Values from a TOML config file for the options not given on the command line. Keys are the
/// options' long names without dashes, `-` written `_` (listen, model, hosts, replicas,
/// heartbeat_interval_ms, heartbeat_misses), and the [metrics] table (metrics.listen,
/// metrics.per_expert). Errors name the file and the key.
class config_file {
 public:
  config_file(const std::string& path) : path_(path) {
    if (path.empty()) return;
    try {
      table_ = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
      fail(path + ": " + std::string(e.description()) + " (line " + std::to_string(e.source().begin.line) + ")");
    }
    for (auto& [k, v] : table_) {
      if (auto* sub = v.as_table())
        for (auto& [k2, v2] : *sub) {
          (void)v2;
          known_.push_back(std::string(k.str()) + "." + std::string(k2.str()));
        }
      else
        known_.push_back(std::string(k.str()));
    }
  }
  void str(const char* key, CLI::Option* opt, std::string& dst) {
    if (auto* n = take(key); n && !opt->count()) {
      if (!n->is_string()) fail(path_ + ": key '" + key + "' must be a string");
      dst = n->as_string()->get();
    }
  }
  void integer(const char* key, CLI::Option* opt, int& dst, int lo, int hi) {
    if (auto* n = take(key); n && !opt->count()) {
      if (!n->is_integer()) fail(path_ + ": key '" + key + "' must be an integer");
      const int64_t v = n->as_integer()->get();
      if (v < lo || v > hi) fail(path_ + ": key '" + key + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
      dst = static_cast<int>(v);
    }
  }
  /// Every key of the file must have been used.
  void check_all_used() const {
    for (auto& k : known_)
      if (std::find(used_.begin(), used_.end(), k) == used_.end()) fail(path_ + ": unknown key '" + k + "'");
  }

 private:
  toml::node* take(const char* key) {
    used_.push_back(key);
    return table_.at_path(key).node();
  }
  std::string path_;
  toml::table table_;
  std::vector<std::string> known_, used_;
};

/// The /metrics listener of --metrics HOST:PORT (none when empty), and the address it bound.
std::optional<std::pair<std::unique_ptr<api::metrics_server>, std::string>> start_metrics(const std::string& address) {
  if (address.empty()) return std::nullopt;
  auto [host, port] = parse_host_port(address, "--metrics");
  auto m = api::metrics_server::start(host, port);
  if (!m) fail(model::describe(m.error()));
  const std::string bound = host + ":" + std::to_string((*m)->port());
  return std::make_pair(std::move(*m), bound);
}

}  // namespace

void add_cluster_commands(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("coordinator", "Run the cluster's coordinator (membership, placement, epochs)");
    struct args {
      std::string config, listen = "127.0.0.1:0", model, state, metrics, per_expert = "all";
      int hosts = 1, replicas = 1, hb_ms = 500, hb_misses = 3, rb_ms = 0, rb_moves = -1;
    };
    auto a = std::make_shared<args>();
    cmd->add_option("--config", a->config, "Cluster config (TOML); flags given here override its keys");
    auto* o_listen = cmd->add_option("--listen", a->listen, "Control-plane address HOST:PORT (port 0 = any)");
    auto* o_model = cmd->add_option("--model", a->model, "Model folder");
    auto* o_state = cmd->add_option("--state", a->state, "State file: every epoch is written there, and a restart recovers from it");
    auto* o_hosts = cmd->add_option("--hosts", a->hosts, "Expert hosts to wait for before placing")->check(CLI::Range(1, 4096));
    auto* o_repl = cmd->add_option("--replicas", a->replicas, "Replicas per expert, on distinct hosts")->check(CLI::Range(1, 64));
    auto* o_hb = cmd->add_option("--heartbeat-interval-ms", a->hb_ms, "Heartbeat period (0 = off)")->check(CLI::Range(0, 600000));
    auto* o_miss = cmd->add_option("--heartbeat-misses", a->hb_misses, "Missed heartbeats before a host is down")->check(CLI::Range(1, 1000));
    auto* o_rb = cmd->add_option("--rebalance-interval-ms", a->rb_ms, "Rebalance every this often (0 = only when asked: switchyard ctl rebalance)")
                     ->check(CLI::Range(0, 86400000));
    auto* o_rbm = cmd->add_option("--rebalance-max-moves", a->rb_moves, "Replicas added per rebalance round (-1 = no limit)")
                      ->check(CLI::Range(-1, 1 << 30));
    auto* o_metrics = cmd->add_option("--metrics", a->metrics, "Serve /metrics on HOST:PORT (port 0 = any; default: not served)");
    auto* o_per_expert = cmd->add_option("--metrics-per-expert", a->per_expert,
                                         "Per-(layer, expert) metric series: all, off, or top:N (the N hottest)");
    cmd->callback([=] {
      config_file f(a->config);
      f.str("metrics.listen", o_metrics, a->metrics);
      f.str("metrics.per_expert", o_per_expert, a->per_expert);
      f.str("listen", o_listen, a->listen);
      f.str("model", o_model, a->model);
      f.str("state_file", o_state, a->state);
      f.integer("hosts", o_hosts, a->hosts, 1, 4096);
      f.integer("replicas", o_repl, a->replicas, 1, 64);
      f.integer("heartbeat_interval_ms", o_hb, a->hb_ms, 0, 600000);
      f.integer("heartbeat_misses", o_miss, a->hb_misses, 1, 1000);
      f.integer("rebalance_interval_ms", o_rb, a->rb_ms, 0, 86400000);
      f.integer("rebalance_max_moves", o_rbm, a->rb_moves, -1, 1 << 30);
      f.check_all_used();
      configure_metrics(a->per_expert, true,
                        o_per_expert->count() || a->config.empty() ? "--metrics-per-expert" : a->config + ": key 'metrics.per_expert'");
      if (a->model.empty()) fail("coordinator: --model (or the config key 'model') is required");
      auto [host, port] = parse_host_port(a->listen, "--listen");
      actors::coordinator_options co;
      co.host = host;
      co.port = port;
      co.model = a->model;
      co.hosts = a->hosts;
      co.replicas = a->replicas;
      co.rebalance.interval = std::chrono::milliseconds(a->rb_ms);
      co.state_file = a->state;
      co.rebalance.max_moves = a->rb_moves;
      co.heartbeat.interval = std::chrono::milliseconds(a->hb_ms);
      co.heartbeat.misses = a->hb_misses;
      auto ms = start_metrics(a->metrics);
      auto c = actors::coordinator_process::start(co);
      if (!c) fail(model::describe(c.error()));
      std::printf("coordinator listening on %s:%u\n", host.c_str(), static_cast<unsigned>((*c)->port()));
      if (ms) std::printf("coordinator metrics on %s\n", ms->second.c_str());
      std::fflush(stdout);
      wait_for_stop_signal();
      if (ms) ms->first->stop();
      (*c)->stop();
    });
  }
  {
    auto* cmd = app.add_subcommand("expert-host", "Run an expert host: holds experts, answers token batches over UCX");
    struct args {
      std::string coordinator, model, listen, metrics, device = "cpu";
      actors::expert_host_options o;  // the flags below write into it; its defaults are the flags' defaults
      bool no_peer_errors = false;
    };
    auto a = std::make_shared<args>();
    a->listen = a->o.listen_host + ":" + std::to_string(a->o.listen_port);
    cmd->add_option("--coordinator", a->coordinator, "Coordinator HOST:PORT")->required();
    cmd->add_option("--model", a->model, "Model folder (shared filesystem or own copy)")->required();
    cmd->add_option("--slots", a->o.slots, "Experts this host can hold")->required()->check(CLI::Range(1, 1 << 20));
    cmd->add_option("--listen", a->listen, "Data-plane address HOST:PORT (port 0 = any)")->capture_default_str();
    cmd->add_option("--name", a->o.name, "Host name (default expert-host-PID)");
    cmd->add_option("--threads", a->o.threads, "Compute threads (0 = all cores)");
    cmd->add_option("--device", a->device, "Where this host computes its experts: cpu, cuda or cuda:N");
    cmd->add_flag("--no-peer-error-handling", a->no_peer_errors, "UCX without peer failure detection (allows shared memory)");
    cmd->add_option("--metrics", a->metrics, "Serve /metrics on HOST:PORT (port 0 = any; default: not served)");
    cmd->callback([a] {
      auto [ch, cp] = parse_host_port(a->coordinator, "--coordinator");
      auto [lh, lp] = parse_host_port(a->listen, "--listen");
      actors::expert_host_options o = a->o;
      o.coordinator_host = ch;
      o.coordinator_port = cp;
      o.model = a->model;
      o.listen_host = lh;
      o.listen_port = lp;
      o.peer_error_handling = !a->no_peer_errors;
      auto dev = make_device(a->device);
      if (!dev) fail(model::describe(dev.error()));
      o.device = std::move(*dev);
      if (o.device) std::printf("expert host computes on %s\n", o.device->describe().c_str());
      auto ms = start_metrics(a->metrics);
      auto h = actors::expert_host_process::start(o);
      if (!h) fail(model::describe(h.error()));
      std::printf("expert host serving token batches on %s:%u\n", lh.c_str(), static_cast<unsigned>((*h)->data_port()));
      if (ms) std::printf("expert host metrics on %s\n", ms->second.c_str());
      std::fflush(stdout);
      wait_for_stop_signal();
      if (ms) ms->first->stop();
      (*h)->stop();
    });
  }
  {
    auto* cmd = app.add_subcommand("router", "Run a router: the dense model, gating, batching, and the HTTP API");
    struct args {
      std::string coordinator, model, per_expert = "all";
      http_options http;
      actors::router_options o;  // the flags below write into it; its defaults are the flags' defaults
      bool no_peer_errors = false, no_metrics = false;
      int64_t batch_timeout_ms = std::chrono::duration_cast<std::chrono::milliseconds>(o.batch_timeout).count();
    };
    auto a = std::make_shared<args>();
    cmd->add_option("--coordinator", a->coordinator, "Coordinator HOST:PORT")->required();
    cmd->add_option("--model", a->model, "Model folder")->required();
    add_http_options(cmd, a->http);
    cmd->add_option("--batch-timeout-ms", a->batch_timeout_ms,
                    "An expert batch with no answer by then is sent to another replica (a hung or slow host)")
        ->capture_default_str()
        ->check(CLI::Range(int64_t{10}, int64_t{600000}));
    cmd->add_option("--threads", a->o.threads, "Compute threads (0 = all cores)");
    cmd->add_option("--max-running", a->o.batcher.max_running, "Sequences decoding at once")->check(CLI::Range(1, 1 << 16));
    cmd->add_option("--max-queue", a->o.batcher.max_queue, "Queued requests before 503")->check(CLI::Range(0, 1 << 20));
    cmd->add_option("--step-tokens", a->o.batcher.step_token_budget, "Tokens per engine step")->check(CLI::Range(1, 1 << 20));
    cmd->add_option("--micro-batches", a->o.micro_batches,
                    "Micro-batches per step: 2 overlaps one half's attention with the other half's experts, 1 does not")
        ->check(CLI::Range(1, 2));
    cmd->add_option("--micro-batch-min-rows", a->o.micro_batch_min_rows,
                    "Rows each half needs before a step is split in two micro-batches")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
    cmd->add_flag("--wire-bf16", a->o.wire_bf16, "Send hidden rows as bf16 (half the bytes; answers then differ from local f32 in rounding)");
    cmd->add_flag("--no-peer-error-handling", a->no_peer_errors, "UCX without peer failure detection");
    cmd->add_option("--metrics-per-expert", a->per_expert,
                    "Per-(layer, expert) metric series on /metrics: all, off, or top:N (the N hottest)");
    cmd->add_flag("--no-metrics", a->no_metrics, "Record no metrics");
    cmd->callback([a] {
      configure_metrics(a->per_expert, !a->no_metrics, "--metrics-per-expert");
      auto [ch, cp] = parse_host_port(a->coordinator, "--coordinator");
      auto hc = make_http_config(a->http);
      auto tok = load_serving_tokenizer(a->http.tokenizer, a->model);
      actors::router_options o = a->o;
      o.batch_timeout = std::chrono::milliseconds(a->batch_timeout_ms);
      o.coordinator_host = ch;
      o.coordinator_port = cp;
      o.model = a->model;
      o.peer_error_handling = !a->no_peer_errors;
      auto r = actors::router_process::start(o);
      if (!r) fail(model::describe(r.error()));
      auto* rp = r->get();
      api::completion_service svc;
      svc.model_name = std::filesystem::path(a->model).filename().string();
      svc.vocab_size = rp->config().vocab_size;
      svc.max_context = rp->config().max_position_embeddings;
      svc.ready = [rp] { return rp->ready(); };
      svc.tokenizer = tok;
      svc.submit = [rp](scheduler::generation_request req) { return rp->submit(std::move(req)); };
      svc.cluster = [rp] { return cluster_view_of(rp->placement(), rp->hosts()); };
      svc.rebalance = [rp] { return rp->rebalance(); };
      svc.cluster_state = [rp] { return rp->state_json(); };
      auto server = api::http_server::start(hc, svc);
      if (!server) fail(model::describe(server.error()));
      std::printf("router serving HTTP on %s:%u\n", hc.host.c_str(), static_cast<unsigned>((*server)->port()));
      std::fflush(stdout);
      serve_until_stopped(**server, [rp] { rp->drain(); }, [rp] { return rp->idle(); }, a->http);
      (*server)->stop();
      rp->stop();
    });
  }
}

}  // namespace sy::apps
