// Metrics: the catalogue's conventions, recording and exposition, the per-expert cardinality switch
// (and the series count of a DeepSeek-V3-sized model), link counters across link replacement, and
// the embedded cluster behind the HTTP server: counters move as the traffic says.
//
// Each TEST_CASE starts from an empty process-wide registry (metrics::testing::reset).
#include "actors/embedded_cluster.hpp"
#include "api/http_server.hpp"
#include "api/metrics_server.hpp"
#include "metrics/metrics.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <regex>
#include <set>

using namespace sy;
using json = nlohmann::json;

namespace {

std::filesystem::path fixture(const std::string& name) { return std::filesystem::path(SY_TEST_DATA) / "hf-tiny" / name; }

/// One request, Connection: close; returns status, Content-Type and body.
struct http_reply {
  int status = 0;
  std::string content_type, body;
};
http_reply http(uint16_t port, const std::string& method, const std::string& path, const std::string& body = "") {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  std::string req = method + " " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n\r\n" + body;
  REQUIRE(::send(fd, req.data(), req.size(), 0) == static_cast<ssize_t>(req.size()));
  std::string resp;
  char buf[8192];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) resp.append(buf, static_cast<size_t>(n));
  ::close(fd);
  REQUIRE(resp.size() > 12);
  http_reply r;
  r.status = std::stoi(resp.substr(9, 3));
  const auto split = resp.find("\r\n\r\n");
  const auto head = resp.substr(0, split);
  std::smatch m;
  if (std::regex_search(head, m, std::regex("Content-Type: ([^\r\n]*)", std::regex::icase))) r.content_type = m[1].str();
  r.body = split == std::string::npos ? "" : resp.substr(split + 4);
  return r;
}

/// Sum of the samples of `name` whose labels contain every `key="value"` of `labels` (exposition text).
double sample_sum(const std::string& text, const std::string& name, const std::vector<std::string>& labels = {}) {
  double s = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line[0] == '#') continue;
    if (line.compare(0, name.size(), name) != 0 || (line[name.size()] != '{' && line[name.size()] != ' ')) continue;
    bool ok = true;
    for (const auto& l : labels) ok = ok && line.find(l) != std::string::npos;
    if (ok) s += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return s;
}

/// Series of one family in an exposition text.
size_t series_of(const std::string& text, const std::string& name) {
  size_t n = 0, pos = 0;
  while ((pos = text.find('\n' + name, pos)) != std::string::npos) {
    const char c = text[pos + 1 + name.size()];
    if (c == '{' || c == ' ') ++n;
    pos += name.size();
  }
  return n;
}

}  // namespace

TEST_CASE("metrics: every family follows the naming conventions", "[metrics]") {
  metrics::testing::reset();
  const std::set<std::string_view> allowed{"layer", "expert", "host", "route", "status", "reason"};
  std::set<std::string_view> names;
  for (const auto& d : metrics::catalog()) {
    INFO(d.name);
    CHECK(d.name.starts_with("switchyard_"));
    CHECK(names.insert(d.name).second);
    CHECK(std::regex_match(std::string(d.name), std::regex("[a-z_]+")));
    CHECK_FALSE(d.help.empty());
    const bool total = d.name.ends_with("_total");
    CHECK(total == (d.type == metrics::family_type::counter));
    if (d.type == metrics::family_type::histogram) {
      CHECK(d.name.ends_with("_seconds"));  // every histogram here is a latency, in the base unit
      REQUIRE(d.buckets.size() >= 5);
      for (size_t i = 1; i < d.buckets.size(); ++i) CHECK(d.buckets[i] > d.buckets[i - 1]);
    } else {
      CHECK(d.buckets.empty());
    }
    // Units are base units: no milliseconds, no kilobytes.
    CHECK(d.name.find("_ms") == std::string_view::npos);
    CHECK(d.name.find("millis") == std::string_view::npos);
    CHECK(d.name.find("kib") == std::string_view::npos);
    if (d.name.find("bytes") != std::string_view::npos) CHECK(d.name.ends_with("_bytes_total"));
    for (auto l : d.labels) CHECK(allowed.count(l) == 1);
    CHECK(d.per_expert == (std::find(d.labels.begin(), d.labels.end(), "expert") != d.labels.end()));
  }
}

TEST_CASE("metrics: per-expert mode parses all, off and top:N and nothing else", "[metrics]") {
  metrics::testing::reset();
  using k = metrics::per_expert_mode::kind;
  CHECK(metrics::parse_per_expert("all") == metrics::per_expert_mode{k::all, 0});
  CHECK(metrics::parse_per_expert("off") == metrics::per_expert_mode{k::off, 0});
  CHECK(metrics::parse_per_expert("top:16") == metrics::per_expert_mode{k::top, 16});
  for (auto bad : {"", "top", "top:", "top:0", "top:-3", "top:12x", "ALL", "top 16", "some"}) {
    INFO(bad);
    CHECK_FALSE(metrics::parse_per_expert(bad));
  }
  CHECK(metrics::to_string(*metrics::parse_per_expert("top:7")) == "top:7");
}

TEST_CASE("metrics: counters, gauges and histograms move as the events say", "[metrics]") {
  metrics::testing::reset();
  for (int i = 0; i < 7; ++i) metrics::http_request("/v1/completions", 200, 0.02);
  for (int i = 0; i < 3; ++i) metrics::http_request("/v1/completions", 503, 0.001);
  metrics::sequence_finished("length", 12, 8, 0.030, 0.100);  // TPOT (0.1 - 0.03) / 7 = 0.01
  metrics::sequence_finished("stop", 5, 1, 0.004, 0.004);     // one token: no TPOT
  metrics::sequence_finished("error", 3, 0, 0, 0.5);          // no token: no TTFT
  metrics::sequences(4, 9);
  metrics::host_metrics h("h-test");
  for (int i = 0; i < 100; ++i) h.request(2, 16, i < 50 ? 0.0003 : 0.003);
  h.refused(metrics::host_metrics::refusal::not_held);
  h.slots(10, 12);
  const auto text = metrics::serialize();
  CHECK(sample_sum(text, "switchyard_http_requests_total", {"status=\"200\""}) == 7);
  CHECK(sample_sum(text, "switchyard_http_requests_total", {"status=\"503\""}) == 3);
  CHECK(sample_sum(text, "switchyard_http_request_duration_seconds_count") == 10);
  CHECK(sample_sum(text, "switchyard_prompt_tokens_total") == 20);
  CHECK(sample_sum(text, "switchyard_generated_tokens_total") == 9);
  CHECK(sample_sum(text, "switchyard_sequences_finished_total") == 3);
  CHECK(sample_sum(text, "switchyard_sequences_finished_total", {"reason=\"error\""}) == 1);
  CHECK(sample_sum(text, "switchyard_time_to_first_token_seconds_count") == 2);
  CHECK(sample_sum(text, "switchyard_time_per_output_token_seconds_count") == 1);
  CHECK(sample_sum(text, "switchyard_time_per_output_token_seconds_sum") == Approx(0.01));
  CHECK(sample_sum(text, "switchyard_time_per_output_token_seconds_bucket", {"le=\"0.005\""}) == 0);
  CHECK(sample_sum(text, "switchyard_time_per_output_token_seconds_bucket", {"le=\"0.01\""}) == 1);
  CHECK(sample_sum(text, "switchyard_sequences_running") == 4);
  CHECK(sample_sum(text, "switchyard_sequences_queued") == 9);
  CHECK(sample_sum(text, "switchyard_host_batches_total", {"host=\"h-test\""}) == 200);
  CHECK(sample_sum(text, "switchyard_host_rows_total", {"host=\"h-test\""}) == 1600);
  CHECK(sample_sum(text, "switchyard_host_batch_duration_seconds_count", {"host=\"h-test\""}) == 100);
  CHECK(sample_sum(text, "switchyard_host_batch_duration_seconds_bucket", {"host=\"h-test\"", "le=\"0.0005\""}) == 50);
  CHECK(sample_sum(text, "switchyard_host_batches_refused_total", {"reason=\"not_held\""}) == 1);
  CHECK(sample_sum(text, "switchyard_host_batches_refused_total", {"reason=\"down\""}) == 0);
  CHECK(sample_sum(text, "switchyard_host_slots_used") == 10);
  CHECK(sample_sum(text, "switchyard_host_slots") == 12);
  // Quantiles as Prometheus' histogram_quantile computes them: the p50 rank (50) ends the
  // (0.00025, 0.0005] bucket, the p99 rank (99) lies in (0.0025, 0.005].
  auto q = metrics::histogram_quantiles(metrics::family::host_batch_duration, "h-test");
  CHECK(q.count == 100);
  CHECK(q.p50 == Approx(0.0005));
  CHECK(q.p99 == Approx(0.0025 + 0.0025 * 49.0 / 50.0));
  // The exposition names its families once each, in catalogue order.
  size_t last = 0;
  for (const auto& d : metrics::catalog()) {
    const auto at = text.find("# TYPE " + std::string(d.name) + " ");
    if (at == std::string::npos) continue;
    CHECK(at >= last);
    last = at;
  }
  // Off: nothing moves.
  metrics::configure({false, {}});
  metrics::http_request("/v1/completions", 200, 0.02);
  h.request(1, 1, 0.001);
  const auto after = metrics::serialize();
  CHECK(sample_sum(after, "switchyard_http_requests_total", {"status=\"200\""}) == 7);
  CHECK(sample_sum(after, "switchyard_host_rows_total", {"host=\"h-test\""}) == 1600);
}

TEST_CASE("metrics: a replaced link's byte and error counts are kept", "[metrics]") {
  metrics::testing::reset();
  metrics::link_counts a{1000, 500, {{"timeout", 2}}};
  {
    metrics::link_watch w("h1", [&] { return a; });
    CHECK(sample_sum(metrics::serialize(), "switchyard_link_sent_bytes_total", {"host=\"h1\""}) == 1000);
    a.bytes_sent = 1500;
    a.errors = {{"timeout", 2}, {"peer_failed", 1}};
  }  // the final read happens as the watch ends
  metrics::link_counts b{300, 40, {}};  // a new link to the same host starts from 0
  metrics::link_watch w2("h1", [&] { return b; });
  const auto text = metrics::serialize();
  CHECK(sample_sum(text, "switchyard_link_sent_bytes_total", {"host=\"h1\""}) == 1800);
  CHECK(sample_sum(text, "switchyard_link_received_bytes_total", {"host=\"h1\""}) == 540);
  CHECK(sample_sum(text, "switchyard_link_errors_total", {"host=\"h1\"", "reason=\"timeout\""}) == 2);
  CHECK(sample_sum(text, "switchyard_link_errors_total", {"host=\"h1\"", "reason=\"peer_failed\""}) == 1);
}

namespace {

/// A process holding every role for a model of `layers` MoE layers × `experts` experts on `hosts`
/// hosts (one replica each), with traffic on every expert: its series count per mode.
struct series_counts {
  size_t all = 0, top = 0, off = 0;
};
series_counts count_for(int first_layer, int layers, int experts, int hosts, int top) {
  std::vector<int> moe;
  for (int l = 0; l < layers; ++l) moe.push_back(first_layer + l);
  metrics::declare_router();
  metrics::expert_layout(moe, experts);
  metrics::coordinator_view v;
  v.epoch = 7;
  v.layers = moe;
  v.experts = experts;
  const size_t n = static_cast<size_t>(layers) * static_cast<size_t>(experts);
  v.replicas.assign(n, 1);
  v.versions.assign(n, 1);
  v.load.assign(n, 1.0);
  v.layer_balancedness.assign(static_cast<size_t>(layers), 0.9);
  v.balancedness = 0.9;
  for (int h = 0; h < hosts; ++h) {
    v.hosts.emplace_back("host-" + std::to_string(h), true);
    metrics::host_metrics hm("host-" + std::to_string(h));
    hm.request(1, 4, 0.001);
    hm.slots(n / static_cast<size_t>(hosts), n / static_cast<size_t>(hosts));
    metrics::host_round_trip("host-" + std::to_string(h), 0.002);
  }
  metrics::coordinator(v);
  for (int l : moe)
    for (int e = 0; e < experts; ++e) metrics::tokens_routed(l, e, static_cast<uint64_t>(1 + (l * 31 + e * 17) % 97));
  metrics::http_request("/v1/completions", 200, 0.1);
  metrics::http_request("/metrics", 200, 0.001);
  metrics::sequence_finished("length", 10, 10, 0.05, 0.5);
  series_counts c;
  metrics::configure({true, *metrics::parse_per_expert("all")});
  c.all = metrics::count_series(metrics::serialize());
  metrics::configure({true, *metrics::parse_per_expert("top:" + std::to_string(top))});
  const auto top_text = metrics::serialize();
  c.top = metrics::count_series(top_text);
  // top:N keeps exactly the N hottest pairs (most tokens routed).
  CHECK(series_of(top_text, "switchyard_expert_tokens_routed_total") == static_cast<size_t>(top));
  metrics::configure({true, *metrics::parse_per_expert("off")});
  const auto off_text = metrics::serialize();
  c.off = metrics::count_series(off_text);
  CHECK(series_of(off_text, "switchyard_expert_tokens_routed_total") == 0);
  CHECK(series_of(off_text, "switchyard_layer_tokens_routed_total") == static_cast<size_t>(layers));
  return c;
}

}  // namespace

TEST_CASE("metrics: series count of a DeepSeek-V3-sized process (58 MoE layers x 256 experts) by mode", "[metrics]") {
  metrics::testing::reset();
  // DeepSeek-V3: layers 3..60 are MoE (the first three dense), 256 routed experts; 32 hosts.
  const auto c = count_for(3, 58, 256, 32, 64);
  // Three per-expert families (tokens routed, replicas, weight version), one series per pair each.
  CHECK(c.all - c.off == 3u * 58u * 256u);
  CHECK(c.top - c.off == 3u * 64u);
  std::printf("series, one process with every role, DeepSeek-V3 size (58 x 256, 32 hosts): all %zu, top:64 %zu, off %zu\n",
              c.all, c.top, c.off);
}

TEST_CASE("metrics: series count of the fixture models by mode", "[metrics]") {
  metrics::testing::reset();
  // The shapes of tests/data/hf-tiny: mixtral_e8k2 (2 MoE layers x 8), qwen3moe_e16k4 (2 x 16),
  // deepseekv3_e16k4 (layer 1 only x 16); 4 hosts.
  const auto mixtral = count_for(0, 2, 8, 4, 4);
  CHECK(mixtral.all - mixtral.off == 3u * 2u * 8u);
  std::printf("series, fixture mixtral_e8k2 (2 x 8, 4 hosts): all %zu, top:4 %zu, off %zu\n", mixtral.all, mixtral.top, mixtral.off);
}

TEST_CASE("metrics: the embedded cluster over HTTP: N requests are N in the counter, routed tokens = tokens x top-k x MoE layers",
          "[metrics]") {
  metrics::testing::reset();
  for (auto name : {"mixtral_e8k2", "deepseekv3_e16k4"}) {
    INFO(name);
    actors::embedded_config cfg;
    cfg.model = fixture(name);
    cfg.hosts = 3;
    auto cluster = actors::embedded_cluster::start(cfg);
    REQUIRE(cluster);
    auto* c = cluster->get();
    REQUIRE(c->wait_ready(std::chrono::seconds(30)));
    api::completion_service svc;
    svc.model_name = name;
    svc.vocab_size = c->config().vocab_size;
    svc.max_context = c->config().max_position_embeddings;
    svc.ready = [c] { return c->ready(); };
    svc.submit = [c](scheduler::generation_request r) { return c->submit(std::move(r)); };
    auto server = api::http_server::start({}, svc);
    REQUIRE(server);
    const uint16_t port = (*server)->port();

    const auto before = http(port, "GET", "/metrics");
    REQUIRE(before.status == 200);
    CHECK(before.content_type == "text/plain; version=0.0.4; charset=utf-8");
    // N requests of 1 or 2 prompts with different lengths; one bad request.
    const int n = 6;
    int64_t forward_tokens = 0, prompts = 0, generated = 0, prompt_tokens = 0;
    for (int i = 0; i < n; ++i) {
      std::vector<std::vector<int>> ps;
      for (int k = 0; k <= i % 2; ++k) {
        std::vector<int> p;
        for (int t = 0; t < 3 + i + k; ++t) p.push_back((7 * t + 11 * i + k) % 50 + 1);
        ps.push_back(p);
      }
      const auto r = http(port, "POST", "/v1/completions", json{{"prompt", ps}, {"max_tokens", 2 + i}}.dump());
      REQUIRE(r.status == 200);
      const auto answer = json::parse(r.body);
      for (const auto& ch : answer["choices"]) {
        const auto out = static_cast<int64_t>(ch["token_ids"].size());
        REQUIRE(out >= 1);
        generated += out;
        ++prompts;
      }
      for (auto& p : ps) prompt_tokens += static_cast<int64_t>(p.size());
    }
    // Every prompt token and every generated token but the last passes through the model once.
    forward_tokens = prompt_tokens + generated - prompts;
    CHECK(http(port, "POST", "/v1/completions", R"({"prompt": "not ids"})").status == 400);
    const auto after = http(port, "GET", "/metrics");
    REQUIRE(after.status == 200);
    auto delta = [&](const std::string& series, const std::vector<std::string>& labels = {}) {
      return sample_sum(after.body, series, labels) - sample_sum(before.body, series, labels);
    };
    CHECK(delta("switchyard_http_requests_total", {"route=\"/v1/completions\"", "status=\"200\""}) == n);
    CHECK(delta("switchyard_http_requests_total", {"route=\"/v1/completions\"", "status=\"400\""}) == 1);
    CHECK(delta("switchyard_http_requests_total", {"route=\"/metrics\"", "status=\"200\""}) == 1);
    CHECK(delta("switchyard_http_request_duration_seconds_count", {"route=\"/v1/completions\""}) == n + 1);
    CHECK(delta("switchyard_prompt_tokens_total") == prompt_tokens);
    CHECK(delta("switchyard_generated_tokens_total") == generated);
    CHECK(delta("switchyard_time_to_first_token_seconds_count") == prompts);
    CHECK(delta("switchyard_sequences_finished_total") == prompts);
    const auto& mc = c->config();
    const int64_t routed = forward_tokens * mc.gating.top_k * mc.num_moe_layers();
    CHECK(delta("switchyard_expert_tokens_routed_total") == routed);
    CHECK(delta("switchyard_layer_tokens_routed_total") == routed);
    for (int l = 0; l < mc.num_layers; ++l) {
      const std::string label = "layer=\"" + std::to_string(l) + "\"";
      CHECK(delta("switchyard_layer_tokens_routed_total", {label}) ==
            (mc.moe_layer[static_cast<size_t>(l)] ? forward_tokens * mc.gating.top_k : 0));
    }
    // Every routed row was computed by exactly one host (no failures here).
    CHECK(delta("switchyard_host_rows_total") == routed);
    // The coordinator's view: every expert of every MoE layer has its one ready replica, all hosts up.
    CHECK(sample_sum(after.body, "switchyard_hosts_up") == 3);
    CHECK(sample_sum(after.body, "switchyard_expert_replicas") == mc.num_moe_layers() * mc.gating.num_experts);
    CHECK(series_of(after.body, "switchyard_expert_replicas") == static_cast<size_t>(mc.num_moe_layers() * mc.gating.num_experts));
    CHECK(sample_sum(after.body, "switchyard_placement_epoch") == static_cast<double>(c->epoch()));

    (*server)->stop();
    c->shutdown();
  }
}

TEST_CASE("metrics: /dashboard is one self-contained page and /dashboard/data has the heatmap and replicas", "[metrics]") {
  metrics::testing::reset();
  actors::embedded_config cfg;
  cfg.model = fixture("qwen3moe_e16k4");
  cfg.hosts = 2;
  cfg.replicas = 2;
  auto cluster = actors::embedded_cluster::start(cfg);
  REQUIRE(cluster);
  auto* c = cluster->get();
  REQUIRE(c->wait_ready(std::chrono::seconds(30)));
  api::completion_service svc;
  svc.model_name = "qwen3moe_e16k4";
  svc.vocab_size = c->config().vocab_size;
  svc.max_context = c->config().max_position_embeddings;
  svc.ready = [c] { return c->ready(); };
  svc.submit = [c](scheduler::generation_request r) { return c->submit(std::move(r)); };
  svc.cluster = [c] {
    api::cluster_view v;
    const auto p = c->placement();
    v.epoch = p.epoch;
    v.hosts = v.hosts_up = c->hosts_up();
    v.experts = p.experts;
    for (int l = 0; l < p.layers; ++l)
      if (p.moe_layer[static_cast<size_t>(l)]) {
        v.layers.push_back(l);
        for (int e = 0; e < p.experts; ++e) v.replicas.push_back(static_cast<int>(p.table[size_t(l)][size_t(e)].size()));
      }
    return v;
  };
  auto server = api::http_server::start({}, svc);
  REQUIRE(server);
  const uint16_t port = (*server)->port();
  const auto page = http(port, "GET", "/dashboard");
  REQUIRE(page.status == 200);
  CHECK(page.content_type.starts_with("text/html"));
  // Self-contained: no external scripts, styles, images or fetches.
  CHECK_FALSE(std::regex_search(page.body, std::regex(R"((src|href)\s*=)")));
  CHECK_FALSE(std::regex_search(page.body, std::regex(R"(https?://|//[a-z])")));
  CHECK(page.body.find("fetch(\"/dashboard/data\"") != std::string::npos);
  CHECK(http(port, "POST", "/dashboard").status == 405);

  const auto done = http(port, "POST", "/v1/completions", R"({"prompt": [[1, 2, 3, 4], [5, 6, 7]], "max_tokens": 5})");
  REQUIRE(done.status == 200);
  int64_t generated = 0;
  const auto answer = json::parse(done.body);
  for (const auto& ch : answer["choices"]) generated += static_cast<int64_t>(ch["token_ids"].size());
  const auto data = http(port, "GET", "/dashboard/data");
  REQUIRE(data.status == 200);
  auto j = json::parse(data.body);
  const auto& mc = c->config();
  REQUIRE(j["layers"].size() == static_cast<size_t>(mc.num_moe_layers()));
  CHECK(j["experts"] == mc.gating.num_experts);
  int64_t tokens = 0;
  for (const auto& row : j["tokens"]) {
    REQUIRE(row.size() == static_cast<size_t>(mc.gating.num_experts));
    for (const auto& v : row) tokens += v.get<int64_t>();
  }
  // 7 prompt tokens + the generated ones fed back (all but each sequence's last), top-k, per MoE layer.
  CHECK(tokens == (7 + generated - 2) * mc.gating.top_k * mc.num_moe_layers());
  for (const auto& row : j["replicas"])
    for (const auto& v : row) CHECK(v == 2);
  CHECK(j["latency"]["ttft"]["count"] == 2);
  CHECK(j["latency"]["e2e"]["count"] == 1);
  CHECK(j["generated_tokens"] == generated);
  // A streamed answer (server-sent events) is counted once, when its stream ends.
  const auto before = http(port, "GET", "/metrics").body;
  const auto streamed = http(port, "POST", "/v1/completions", R"({"prompt": [1, 2, 3], "max_tokens": 3, "stream": true})");
  REQUIRE(streamed.status == 200);
  CHECK(streamed.body.find("[DONE]") != std::string::npos);
  const auto after = http(port, "GET", "/metrics").body;
  const std::vector<std::string> ok{"route=\"/v1/completions\"", "status=\"200\""};
  CHECK(sample_sum(after, "switchyard_http_requests_total", ok) - sample_sum(before, "switchyard_http_requests_total", ok) == 1);
  CHECK(sample_sum(after, "switchyard_time_to_first_token_seconds_count") - sample_sum(before, "switchyard_time_to_first_token_seconds_count") == 1);
  (*server)->stop();
  c->shutdown();
}

TEST_CASE("metrics: the metrics listener serves /metrics and /healthz, 404 and 405 otherwise", "[metrics]") {
  metrics::testing::reset();
  metrics::declare_coordinator();
  auto s = api::metrics_server::start("127.0.0.1", 0);
  REQUIRE(s);
  const uint16_t port = (*s)->port();
  const auto m = http(port, "GET", "/metrics");
  CHECK(m.status == 200);
  CHECK(m.content_type == "text/plain; version=0.0.4; charset=utf-8");
  CHECK(m.body.find("switchyard_placement_epoch 0") != std::string::npos);
  CHECK(http(port, "GET", "/healthz").status == 200);
  CHECK(http(port, "GET", "/nope").status == 404);
  CHECK(http(port, "POST", "/metrics").status == 405);
  // Scrapes are counted (in the next exposition): the first GET, and the POST's 405.
  const auto again = http(port, "GET", "/metrics").body;
  CHECK(sample_sum(again, "switchyard_http_requests_total", {"route=\"/metrics\"", "status=\"200\""}) == 1);
  CHECK(sample_sum(again, "switchyard_http_requests_total", {"route=\"/metrics\"", "status=\"405\""}) == 1);
  CHECK(sample_sum(again, "switchyard_http_requests_total", {"route=\"other\"", "status=\"404\""}) == 1);
  auto busy = api::metrics_server::start("127.0.0.1", port);
  REQUIRE_FALSE(busy);
  CHECK(model::describe(busy.error()).find("--metrics: cannot listen on 127.0.0.1:" + std::to_string(port)) != std::string::npos);
  CHECK_FALSE(api::metrics_server::start("not-an-ip", 0));
}
