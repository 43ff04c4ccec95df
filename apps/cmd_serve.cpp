// switchyard serve: the embedded cluster (coordinator, router, expert hosts as actors in one process)
// behind the HTTP API.
#include "actors/embedded_cluster.hpp"
#include "api/http_server.hpp"
#include "apps/device.hpp"
#include "apps/cli.hpp"
#include "apps/http_options.hpp"
#include "apps/commands.hpp"
#include "apps/observe.hpp"
#include "apps/progress.hpp"
#include "model/make_model.hpp"

#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <thread>

namespace sy::apps {

namespace {

namespace fs = std::filesystem;

/// The demo model `serve` makes when given none: a small Mixtral-shaped checkpoint, made once.
fs::path demo_model() {
  const char* cache = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  fs::path dir = cache ? fs::path(cache) : fs::path(home ? home : "/tmp") / ".cache";
  dir /= "switchyard/demo-mixtral-h256-e8k2-l4";
  if (fs::exists(dir / "model.safetensors.index.json")) return dir;
  model::make_model_options o;
  o.family = model::family_id::mixtral;
  o.hidden = 256;
  o.ffn = 512;
  o.experts = 8;
  o.top_k = 2;
  o.layers = 4;
  o.vocab = 1024;
  o.seed = 1;
  std::fprintf(stderr, "making the demo model in %s (once)\n", dir.c_str());
  if (auto e = model::make_model(dir, o)) fail(model::describe(e));
  return dir;
}

}  // namespace

void add_serve_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Run the embedded cluster (coordinator, router, expert hosts) with the HTTP API");
  struct args {
    std::string model, per_expert = "all", device = "cpu";
    http_options http;
    int hosts = 4, replicas = 1, threads = 0, max_running = 64, max_queue = 256, budget = 512;
    bool no_metrics = false;
  };
  auto a = std::make_shared<args>();
  cmd->add_option("--model", a->model, "Model folder (Hugging Face layout); default: a demo model made once");
  add_http_options(cmd, a->http);
  cmd->add_option("--hosts", a->hosts, "Expert hosts")->check(CLI::Range(1, 1024));
  cmd->add_option("--replicas", a->replicas, "Replicas per expert, on distinct hosts")->check(CLI::Range(1, 64));
  cmd->add_option("--threads", a->threads, "Compute threads (0 = all cores)");
  cmd->add_option("--device", a->device, "Where the expert hosts compute: cpu, cuda or cuda:N");
  cmd->add_option("--max-running", a->max_running, "Sequences decoding at once")->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--max-queue", a->max_queue, "Queued requests before 503")->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--step-tokens", a->budget, "Tokens per engine step (prefill chunking)")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--metrics-per-expert", a->per_expert,
                  "Per-(layer, expert) metric series: all, off, or top:N (the N hottest); per-layer sums always");
  cmd->add_flag("--no-metrics", a->no_metrics, "Record no metrics (/metrics then serves what was recorded before: nothing)");
  cmd->callback([a] {
    configure_metrics(a->per_expert, !a->no_metrics, "--metrics-per-expert");
    actors::embedded_config cfg;
    cfg.model = a->model.empty() ? demo_model() : fs::path(a->model);
    cfg.hosts = a->hosts;
    cfg.replicas = a->replicas;
    cfg.threads = a->threads;
    if (a->device != "cpu") {
      if (auto d = make_device(a->device); !d) fail(model::describe(d.error()));
      cfg.make_device = [spec = a->device] { return make_device(spec); };
    }
    cfg.batcher.max_running = a->max_running;
    cfg.batcher.max_queue = a->max_queue;
    cfg.batcher.step_token_budget = a->budget;
    auto hc = make_http_config(a->http);
    auto tok = load_serving_tokenizer(a->http.tokenizer, cfg.model.string());
    auto cluster = actors::embedded_cluster::start(cfg);
    if (!cluster) fail(model::describe(cluster.error()));
    auto* c = cluster->get();
    api::completion_service svc;
    svc.model_name = cfg.model.filename().string();
    svc.vocab_size = c->config().vocab_size;
    svc.max_context = c->config().max_position_embeddings;
    svc.ready = [c] { return c->ready(); };
    svc.tokenizer = tok;
    svc.submit = [c](scheduler::generation_request r) { return c->submit(std::move(r)); };
    svc.cluster = [c] { return cluster_view_of(c->placement(), c->hosts()); };
    svc.rebalance = [c] { return c->rebalance(); };
    svc.cluster_state = [c] { return c->state_json(); };
    auto server = api::http_server::start(hc, svc);
    if (!server) fail(model::describe(server.error()));
    if (!c->wait_ready(std::chrono::minutes(10))) fail("the cluster did not become ready (see the log)");
    std::printf("serving %s on http://%s:%u with %d expert hosts x %d replicas (placement epoch %llu)\n",
                cfg.model.c_str(), hc.host.c_str(), static_cast<unsigned>((*server)->port()), cfg.hosts, cfg.replicas,
                static_cast<unsigned long long>(c->epoch()));
    std::printf("try: curl -s http://%s:%u/v1/completions -d '{\"prompt\": [1, 2, 3], \"max_tokens\": 8}'\n", hc.host.c_str(),
                static_cast<unsigned>((*server)->port()));
    std::fflush(stdout);
    serve_until_stopped(**server, [c] { c->drain(); }, [c] { return c->idle(); }, a->http);
    (*server)->stop();
    c->shutdown();
  });
}

}  // namespace sy::apps
