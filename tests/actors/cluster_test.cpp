// The embedded cluster (coordinator, router, expert hosts as actors; in-process data plane) against
// transformers' greedy tokens, directly and over HTTP, with replicas and a host failing mid-run.
#include "actors/cluster_executor.hpp"
#include "actors/embedded_cluster.hpp"
#include "tests/actors/reference.hpp"
#include "actors/placement.hpp"
#include "api/http_server.hpp"
#include "model/error.hpp"
#include "model/moe.hpp"
#include "model/safetensors.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <future>
#include <mutex>
#include <optional>
#include <span>
#include <map>
#include <set>
#include <thread>

using namespace sy;
using json = nlohmann::json;

namespace {

using sy::test::fixture;
using sy::test::generate;
using sy::test::read_reference;
using sy::test::reference;

std::unique_ptr<actors::embedded_cluster> start(const std::string& name, int hosts, int replicas) {
  actors::embedded_config cfg;
  cfg.replica_wait = std::chrono::milliseconds(300);
  cfg.model = fixture(name);
  cfg.hosts = hosts;
  cfg.replicas = replicas;
  auto c = actors::embedded_cluster::start(cfg);
  REQUIRE(c);
  REQUIRE((*c)->wait_ready(std::chrono::seconds(30)));
  return std::move(*c);
}

/// A minimal HTTP/1.1 client for loopback tests: one request, Connection: close.
std::pair<int, std::string> http(uint16_t port, const std::string& method, const std::string& path, const std::string& body = "",
                                 const std::string& extra_headers = "") {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  std::string req = method + " " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n" +
                    "Content-Length: " + std::to_string(body.size()) + "\r\n" + extra_headers + "\r\n" + body;
  REQUIRE(::send(fd, req.data(), req.size(), 0) == static_cast<ssize_t>(req.size()));
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) resp.append(buf, static_cast<size_t>(n));
  ::close(fd);
  REQUIRE(resp.size() > 12);
  const int status = std::stoi(resp.substr(9, 3));
  const auto split = resp.find("\r\n\r\n");
  return {status, split == std::string::npos ? "" : resp.substr(split + 4)};
}

}  // namespace

TEST_CASE("placement: replicas of every expert on distinct hosts, within slots", "[actors]") {
  model::model_config c;
  c.num_layers = 3;
  c.moe_layer = {false, true, true};
  c.gating.num_experts = 8;
  std::vector<actors::host_info> hosts;
  for (int h = 0; h < 4; ++h) hosts.push_back({h, "h" + std::to_string(h), "inproc://" + std::to_string(h), 8, true});
  auto p = actors::plan_initial(c, hosts, 2);
  REQUIRE(p);
  std::vector<int> per_host(4, 0);
  for (int l = 1; l < 3; ++l)
    for (int e = 0; e < 8; ++e) {
      const auto& rs = p->table[size_t(l)][size_t(e)];
      REQUIRE(rs.size() == 2);
      CHECK(rs[0].host != rs[1].host);
      for (auto& r : rs) ++per_host[size_t(r.host)];
    }
  for (int n : per_host) CHECK(n == 8);  // 32 replicas spread evenly
  CHECK(p->table[0].empty());            // the dense layer holds no experts
  hosts[3].slots = 1;
  hosts[2].slots = 1;
  auto tight = actors::plan_initial(c, hosts, 2);
  CHECK_FALSE(tight);  // 18 slots for 32 replicas
  CHECK_FALSE(actors::plan_initial(c, hosts, 5));  // more replicas than hosts
}

TEST_CASE("embedded cluster: answers equal transformers' greedy tokens, batched and one by one", "[actors]") {
  for (auto name : {"mixtral_e8k2", "qwen2moe_e8k2_shared", "qwen3moe_e16k4", "deepseekv3_e16k4"}) {
    INFO(name);
    auto ref = read_reference(name);
    auto c = start(name, 3, 2);
    auto batched = generate(*c, ref.prompts, static_cast<int>(ref.greedy[0].size()));
    for (size_t i = 0; i < ref.prompts.size(); ++i) {
      CHECK_FALSE(batched[i].error);
      CHECK(batched[i].tokens == ref.greedy[i]);
      CHECK(batched[i].finish_reason == "length");
      auto one = generate(*c, {ref.prompts[i]}, static_cast<int>(ref.greedy[i].size()));
      CHECK(one[0].tokens == ref.greedy[i]);
    }
  }
}

namespace {
/// A device backend on the CPU that records what the host asks of it (the GPU one is tested on a
/// GPU by tests/gpu): uploads, removals, batches.
struct recording_device final : model::device_experts {
  std::mutex mu;
  /// The host keeps the weights alive while they are held (it frees them after `remove`).
  std::map<std::pair<int, int>, const model::expert_weights*> held;
  std::atomic<int> adds{0}, removes{0}, runs{0};
  caf::error add(int layer, int expert, const model::expert_weights& w) override {
    std::lock_guard lock(mu);
    held[{layer, expert}] = &w;
    ++adds;
    return {};
  }
  void remove(int layer, int expert) override {
    std::lock_guard lock(mu);
    held.erase({layer, expert});
    ++removes;
  }
  caf::error run(int layer, std::span<const int> experts, std::span<const float* const> inputs,
                 std::span<const int64_t> rows, std::span<float* const> outputs) override {
    std::lock_guard lock(mu);
    ++runs;
    for (size_t i = 0; i < experts.size(); ++i) {
      auto it = held.find({layer, experts[i]});
      if (it == held.end()) return model::make_error(model::model_errc::invalid_argument, "not on the device");
      model::expert_forward(*it->second, inputs[i], rows[i], outputs[i]);
    }
    return {};
  }
  std::string describe() const override { return "recording"; }
};
}  // namespace

TEST_CASE("embedded cluster: hosts with a device backend compute there and answer the reference tokens", "[actors]") {
  std::vector<std::shared_ptr<recording_device>> devices;
  actors::embedded_config cfg;
  cfg.model = fixture("qwen3moe_e16k4");
  cfg.hosts = 3;
  cfg.make_device = [&devices]() -> caf::expected<std::shared_ptr<model::device_experts>> {
    devices.push_back(std::make_shared<recording_device>());
    return std::shared_ptr<model::device_experts>(devices.back());
  };
  auto c = actors::embedded_cluster::start(cfg);
  REQUIRE(c);
  REQUIRE((*c)->wait_ready(std::chrono::seconds(30)));
  REQUIRE(devices.size() == 3);
  const auto ref = read_reference("qwen3moe_e16k4");
  auto out = generate(**c, ref.prompts, static_cast<int>(ref.greedy[0].size()));
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i].tokens == ref.greedy[i]);
  int adds = 0, runs = 0;
  size_t held = 0;
  for (auto& d : devices) {
    adds += d->adds;
    runs += d->runs;
    held += d->held.size();
  }
  // Every placed expert was uploaded once and every batch ran on a device.
  CHECK(held == static_cast<size_t>(adds));
  CHECK(held > 0);
  CHECK(runs > 0);
}

TEST_CASE("embedded cluster: a host failing while requests run loses none of them (2 replicas)", "[actors]") {
  auto ref = read_reference("qwen3moe_e16k4");
  auto c = start("qwen3moe_e16k4", 4, 2);
  // 16 copies of each prompt: the host dies while they decode.
  std::vector<std::vector<int32_t>> prompts;
  std::vector<size_t> which;
  for (int copy = 0; copy < 16; ++copy)
    for (size_t i = 0; i < ref.prompts.size(); ++i) {
      prompts.push_back(ref.prompts[i]);
      which.push_back(i);
    }
  std::atomic<bool> killed{false};
  std::thread killer([&] {
    for (auto t0 = std::chrono::steady_clock::now(); c->running() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20);) std::this_thread::yield();
    c->kill_host(1);
    killed = true;
  });
  auto out = generate(*c, prompts, static_cast<int>(ref.greedy[0].size()));
  killer.join();
  CHECK(killed);
  for (size_t i = 0; i < out.size(); ++i) {
    INFO("request " << i);
    CHECK_FALSE(out[i].error);
    CHECK(out[i].tokens == ref.greedy[which[i]]);
  }
  // The coordinator saw the host go down and published a new epoch without it.
  CHECK(c->epoch() > 5);
}

TEST_CASE("embedded cluster: with one replica, losing its host fails requests with a reason", "[actors]") {
  auto ref = read_reference("mixtral_e8k2");
  auto c = start("mixtral_e8k2", 2, 1);
  c->kill_host(0);
  auto out = generate(*c, {ref.prompts[0]}, 4);
  CHECK(out[0].finish_reason == "error");
  CHECK(out[0].error);
}

TEST_CASE("HTTP: /v1/completions over the embedded cluster, health, readiness and errors", "[actors][http]") {
  auto ref = read_reference("mixtral_e8k2");
  auto c = start("mixtral_e8k2", 2, 1);
  api::completion_service svc;
  svc.model_name = "mixtral_e8k2";
  svc.vocab_size = c->config().vocab_size;
  svc.max_context = c->config().max_position_embeddings;
  svc.ready = [&] { return c->ready(); };
  svc.submit = [&](scheduler::generation_request r) { return c->submit(std::move(r)); };
  auto server = api::http_server::start({}, svc);
  REQUIRE(server);
  const uint16_t port = (*server)->port();

  auto [hs, hb] = http(port, "GET", "/healthz");
  CHECK(hs == 200);
  auto [rs, rb] = http(port, "GET", "/readyz");
  CHECK(rs == 200);

  json body = {{"prompt", ref.prompts}, {"max_tokens", ref.greedy[0].size()}};
  auto [s, b] = http(port, "POST", "/v1/completions", body.dump());
  REQUIRE(s == 200);
  auto j = json::parse(b);
  CHECK(j["object"] == "text_completion");
  REQUIRE(j["choices"].size() == 2);
  for (size_t i = 0; i < 2; ++i) CHECK(j["choices"][i]["token_ids"].get<std::vector<int32_t>>() == ref.greedy[i]);
  CHECK(j["usage"]["completion_tokens"] == 2 * ref.greedy[0].size());

  // One prompt as a flat list.
  auto [s1, b1] = http(port, "POST", "/v1/completions", json{{"prompt", ref.prompts[1]}, {"max_tokens", 8}}.dump());
  REQUIRE(s1 == 200);
  CHECK(json::parse(b1)["choices"][0]["token_ids"].get<std::vector<int32_t>>() == ref.greedy[1]);

  struct bad_case {
    std::string body, param;
  };
  for (auto& bc : std::vector<bad_case>{{R"({"prompt": [1, 2], "max_tokens": "x"})", "max_tokens"},
                                        {R"({"prompt": [1, 99999]})", "prompt"},
                                        {R"({"prompt": []})", "prompt"},
                                        {R"({"max_tokens": 3})", "prompt"},
                                        {R"({"prompt": [1], "temperature": -1})", "temperature"},
                                        {R"({"prompt": [1], "model": "other"})", "model"},
                                        {R"({"prompt": [1], "max_tokens": 1000})", "max_tokens"}}) {
    INFO(bc.body);
    auto [st, eb] = http(port, "POST", "/v1/completions", bc.body);
    CHECK(st == 400);
    auto e = json::parse(eb);
    CHECK(e["error"]["param"] == bc.param);
    CHECK(e["error"]["type"] == "invalid_request_error");
  }
  auto [sj, bj] = http(port, "POST", "/v1/completions", "{not json");
  CHECK(sj == 400);
  CHECK(http(port, "GET", "/nope").first == 404);
  CHECK(http(port, "GET", "/v1/completions").first == 405);
  (*server)->stop();
}

TEST_CASE("embedded cluster: a hung host is found by the coordinator's heartbeat and traffic goes elsewhere", "[actors]") {
  auto ref = read_reference("mixtral_e8k2");
  actors::embedded_config cfg;
  cfg.model = fixture("mixtral_e8k2");
  cfg.hosts = 3;
  cfg.replicas = 2;
  cfg.heartbeat.interval = std::chrono::milliseconds(50);
  cfg.heartbeat.misses = 3;
  auto c = actors::embedded_cluster::start(cfg);
  REQUIRE(c);
  REQUIRE((*c)->wait_ready(std::chrono::seconds(30)));
  REQUIRE((*c)->hosts_up() == 3);
  (*c)->freeze_host(2);
  const auto t0 = std::chrono::steady_clock::now();
  while ((*c)->hosts_up() == 3 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const auto found = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  INFO("detected after " << found.count() << " ms");
  CHECK((*c)->hosts_up() == 2);
  CHECK(found < std::chrono::seconds(2));  // 3 misses of 50 ms, with slack for a loaded machine
  auto out = generate(**c, ref.prompts, static_cast<int>(ref.greedy[0].size()));
  for (size_t i = 0; i < 2; ++i) CHECK(out[i].tokens == ref.greedy[i]);
}

TEST_CASE("embedded cluster: rebalancing while requests run loses none of them and follows the load", "[actors]") {
  auto ref = read_reference("qwen3moe_e16k4");
  actors::embedded_config cfg;
  cfg.replica_wait = std::chrono::milliseconds(300);
  cfg.model = fixture("qwen3moe_e16k4");
  cfg.hosts = 4;
  cfg.replicas = 1;
  cfg.rebalance.report_interval = std::chrono::milliseconds(10);
  cfg.rebalance.min_gain = 0;  // apply any improvement: this test wants the moves
  auto started = actors::embedded_cluster::start(cfg);
  REQUIRE(started);
  auto& c = *started;
  REQUIRE(c->wait_ready(std::chrono::seconds(30)));
  const auto before = c->placement();
  // Some traffic first, so the coordinator has a load estimate.
  auto warm = generate(*c, ref.prompts, 4);
  for (auto& w : warm) REQUIRE_FALSE(w.error);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));

  std::vector<std::vector<int32_t>> prompts;
  std::vector<size_t> which;
  for (int copy = 0; copy < 16; ++copy)
    for (size_t i = 0; i < ref.prompts.size(); ++i) {
      prompts.push_back(ref.prompts[i]);
      which.push_back(i);
    }
  std::string summary;
  std::thread rebalancer([&] {
    for (auto t0 = std::chrono::steady_clock::now(); c->running() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20);) std::this_thread::yield();
    auto s = c->rebalance();
    summary = s ? *s : sy::model::describe(s.error());
  });
  auto out = generate(*c, prompts, static_cast<int>(ref.greedy[0].size()));
  rebalancer.join();
  INFO(summary);
  for (size_t i = 0; i < out.size(); ++i) {
    INFO("request " << i);
    CHECK_FALSE(out[i].error);
    CHECK(out[i].tokens == ref.greedy[which[i]]);
  }
  auto j = nlohmann::json::parse(summary);
  REQUIRE(j["status"] == "done");
  CHECK(j["load_observed"] == true);
  CHECK(j["balancedness_after"].get<double>() > j["balancedness_before"].get<double>());
  CHECK(j["moves"].get<int>() > 0);
  const auto after = c->placement();
  CHECK(after.epoch > before.epoch);
  // More replicas than one per expert now, every expert still served, shares summing to 1.
  size_t replicas_before = 0, replicas_after = 0;
  for (int l = 0; l < after.layers; ++l) {
    for (const auto& rs : before.table[static_cast<size_t>(l)]) replicas_before += rs.size();
    for (const auto& rs : after.table[static_cast<size_t>(l)]) {
      replicas_after += rs.size();
      if (!after.moe_layer[static_cast<size_t>(l)]) continue;
      REQUIRE_FALSE(rs.empty());
      double sum = 0;
      for (const auto& r : rs) sum += r.share;
      CHECK(std::abs(sum - 1.0) < 1e-6);
    }
  }
  CHECK(replicas_after > replicas_before);
  // Requests after the rebalance still give the reference answers.
  auto again = generate(*c, ref.prompts, static_cast<int>(ref.greedy[0].size()));
  for (size_t i = 0; i < again.size(); ++i) CHECK(again[i].tokens == ref.greedy[i]);
}

TEST_CASE("HTTP: admin routes need the bearer token, stay closed without one, and rebalance answers", "[actors][http]") {
  auto c = start("mixtral_e8k2", 2, 1);
  api::completion_service svc;
  svc.model_name = "mixtral_e8k2";
  svc.vocab_size = c->config().vocab_size;
  svc.max_context = c->config().max_position_embeddings;
  svc.ready = [&] { return c->ready(); };
  svc.submit = [&](scheduler::generation_request r) { return c->submit(std::move(r)); };
  svc.rebalance = [&] { return c->rebalance(); };
  svc.cluster_state = [&] { return c->state_json(); };
  // Every route is either public by this explicit list or protected.
  // Every route is public by this explicit list, or protected: admin (always), or inference
  // (when an API token is configured).
  const std::set<std::string> public_routes{"/healthz", "/readyz", "/metrics", "/dashboard", "/dashboard/data"};
  for (const auto& r : api::routes()) {
    INFO(r.path);
    CHECK((r.admin || r.inference) != (public_routes.count(r.path) == 1));
  }
  {
    auto closed = api::http_server::start({}, svc);  // no admin token configured
    REQUIRE(closed);
    for (const auto& r : api::routes()) {
      if (!r.admin) continue;
      auto [st, b] = http((*closed)->port(), r.method, r.path, "{}", "Authorization: Bearer anything\r\n");
      CHECK(st == 401);
      CHECK_THAT(b, Catch::Matchers::Contains("closed"));
    }
    (*closed)->stop();
  }
  api::http_config hc;
  hc.admin_token = "s3cret";
  auto server = api::http_server::start(hc, svc);
  REQUIRE(server);
  const uint16_t port = (*server)->port();
  for (const auto& r : api::routes()) {
    if (!r.admin) continue;
    INFO(r.path);
    CHECK(http(port, r.method, r.path, "{}").first == 401);
    CHECK(http(port, r.method, r.path, "{}", "Authorization: Bearer s3creT\r\n").first == 401);
    CHECK(http(port, r.method, r.path, "{}", "Authorization: Bearer s3cret-and-more\r\n").first == 401);
  }
  auto [st, body] = http(port, "POST", "/admin/rebalance", "{}", "Authorization: Bearer s3cret\r\n");
  CHECK(st == 200);
  auto j = json::parse(body);
  CHECK(j.contains("status"));
  CHECK(http(port, "GET", "/admin/rebalance", "", "Authorization: Bearer s3cret\r\n").first == 405);
  // The cluster's state: both hosts up, every expert of every sparse layer with a ready replica.
  auto [cs, cb] = http(port, "GET", "/admin/cluster", "", "Authorization: Bearer s3cret\r\n");
  REQUIRE(cs == 200);
  auto state = json::parse(cb);
  CHECK(state["epoch"].get<uint64_t>() == c->epoch());
  REQUIRE(state["hosts"].size() == 2);
  int replicas = 0;
  for (auto& h : state["hosts"]) {
    CHECK(h["up"] == true);
    replicas += h["replicas"].get<int>();
  }
  REQUIRE_FALSE(state["layers"].empty());
  int listed = 0;
  for (auto& layer : state["layers"])
    for (auto& reps : layer["experts"]) {
      CHECK_FALSE(reps.empty());
      for (auto& r : reps) CHECK(r["ready"] == true);
      listed += static_cast<int>(reps.size());
    }
  CHECK(listed == replicas);
  CHECK(api::constant_time_equal("abc", "abc"));
  CHECK_FALSE(api::constant_time_equal("abc", "abd"));
  CHECK_FALSE(api::constant_time_equal("abc", "ab"));
  (*server)->stop();
}

TEST_CASE("embedded cluster: with one replica, a lost host's experts are re-placed on the survivors and no request fails", "[actors]") {
  auto ref = read_reference("qwen3moe_e16k4");
  actors::embedded_config cfg;
  cfg.model = fixture("qwen3moe_e16k4");
  cfg.hosts = 3;
  cfg.replicas = 1;
  cfg.replica_wait = std::chrono::seconds(20);  // queued steps wait this long for a replica to return
  auto started = actors::embedded_cluster::start(cfg);
  REQUIRE(started);
  auto& c = *started;
  REQUIRE(c->wait_ready(std::chrono::seconds(30)));
  std::vector<std::vector<int32_t>> prompts;
  std::vector<size_t> which;
  for (int copy = 0; copy < 8; ++copy)
    for (size_t i = 0; i < ref.prompts.size(); ++i) {
      prompts.push_back(ref.prompts[i]);
      which.push_back(i);
    }
  std::thread killer([&] {
    for (auto t0 = std::chrono::steady_clock::now(); c->running() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20);) std::this_thread::yield();
    c->kill_host(1);
  });
  auto out = generate(*c, prompts, static_cast<int>(ref.greedy[0].size()));
  killer.join();
  for (size_t i = 0; i < out.size(); ++i) {
    INFO("request " << i << ": " << sy::model::describe(out[i].error));
    CHECK_FALSE(out[i].error);
    CHECK(out[i].tokens == ref.greedy[which[i]]);
  }
  CHECK(c->hosts_up() == 2);
  const auto p = c->placement();
  // Every expert has a replica, and they all sit on the two survivors (host ids are the
  // coordinator's registration order, so the dead one is whichever no longer appears).
  std::set<int> holders;
  for (int l = 0; l < p.layers; ++l) {
    if (!p.moe_layer[static_cast<size_t>(l)]) continue;
    for (const auto& rs : p.table[static_cast<size_t>(l)]) {
      REQUIRE_FALSE(rs.empty());
      for (const auto& r : rs) holders.insert(r.host);
    }
  }
  CHECK(holders.size() == 2);
}

TEST_CASE("cluster executor: a placement for another model's shape or naming unknown hosts is refused, the current one kept",
          "[actors]") {
  sy::actors::cluster_executor exec([](const sy::actors::host_info&) { return std::shared_ptr<sy::actors::expert_channel>{}; });
  exec.set_shape(2, 4, {false, true});  // layer 0 dense, layer 1 with 4 experts
  const std::vector<sy::actors::host_info> hosts = {{0, "a", "inproc://0", 8, true}};
  auto table_for = [](int layers, int experts, std::vector<bool> moe, uint64_t epoch, int host) {
    sy::actors::placement_table p;
    p.epoch = epoch, p.layers = layers, p.experts = experts, p.moe_layer = moe;
    p.table.resize(static_cast<size_t>(layers));
    for (int l = 0; l < layers; ++l)
      if (moe[static_cast<size_t>(l)])
        for (int e = 0; e < experts; ++e) p.table[static_cast<size_t>(l)].push_back({{host, e, 1, 1.0, true}});
    return p;
  };
  CHECK(exec.update(table_for(2, 4, {false, true}, 5, 0), hosts));
  CHECK(exec.epoch() == 5);
  CHECK(exec.ready());
  CHECK_FALSE(exec.update(table_for(2, 8, {false, true}, 6, 0), hosts));  // other expert count
  CHECK_FALSE(exec.update(table_for(3, 4, {false, true, true}, 7, 0), hosts));  // other layer count
  CHECK_FALSE(exec.update(table_for(2, 4, {true, true}, 8, 0), hosts));  // other sparse layers
  CHECK_FALSE(exec.update(table_for(2, 4, {false, true}, 9, 3), hosts));  // a host it does not list
  auto short_row = table_for(2, 4, {false, true}, 10, 0);
  short_row.table[1].pop_back();
  CHECK_FALSE(exec.update(short_row, hosts));
  CHECK(exec.epoch() == 5);
  CHECK(exec.ready());
  CHECK(exec.update(table_for(2, 4, {false, true}, 11, 0), hosts));
  CHECK(exec.epoch() == 11);
}

namespace {

/// A channel that counts its calls, fails the first `failures` of them, and otherwise answers
/// each row with itself doubled.
struct counting_channel final : sy::actors::expert_channel {
  int calls = 0;
  int failures = 0;
  caf::error call(int, uint64_t, std::span<const int>, std::span<const std::vector<float>* const> inputs,
                  std::span<std::vector<float>* const> outputs) override {
    ++calls;
    if (calls <= failures) return model::make_error(model::model_errc::io_error, "no answer in time");
    for (size_t i = 0; i < inputs.size(); ++i) {
      outputs[i]->resize(inputs[i]->size());
      for (size_t j = 0; j < inputs[i]->size(); ++j) (*outputs[i])[j] = 2 * (*inputs[i])[j];
    }
    return {};
  }
};

}  // namespace

TEST_CASE("cluster executor: a host whose call failed is passed over by later steps while another replica can answer",
          "[actors]") {
  auto a = std::make_shared<counting_channel>(), b = std::make_shared<counting_channel>();
  b->failures = 1;  // b's first call fails (a batch timeout, a broken link), later ones succeed
  sy::actors::cluster_executor exec([&](const sy::actors::host_info& h) -> std::shared_ptr<sy::actors::expert_channel> {
    return h.id == 0 ? a : b;
  });
  const std::vector<sy::actors::host_info> hosts = {{0, "a", "tcp://a", 8, true}, {1, "b", "tcp://b", 8, true}};
  sy::actors::placement_table p;
  p.epoch = 1, p.layers = 1, p.experts = 2, p.moe_layer = {true};
  // Expert 0 on both hosts, all of its traffic to b while b answers; expert 1 on b alone.
  p.table = {{{{1, 0, 1, 1.0, true}, {0, 1, 1, 0.0, true}}, {{1, 2, 1, 1.0, true}}}};
  REQUIRE(exec.update(p, hosts));
  auto step = [&](int expert) {
    model::dispatch_plan plan;
    plan.tokens = 2;
    plan.batches.push_back({expert, {0, 1}, {1.0f, 1.0f}});
    std::vector<std::vector<float>> in{{1, 2, 3, 4}}, out{{0, 0, 0, 0}};
    exec.begin_step();
    auto err = exec.run(0, plan, in, out);
    exec.end_step();
    CHECK_FALSE(err);
    CHECK(out[0] == std::vector<float>{2, 4, 6, 8});
  };
  step(0);  // b fails, a answers the retry
  CHECK(b->calls == 1);
  CHECK(a->calls == 1);
  step(0);  // b is passed over: a answers at once, b is not asked again
  CHECK(b->calls == 1);
  CHECK(a->calls == 2);
  step(1);  // expert 1 has no replica but b's: b is asked though passed over, and answers
  CHECK(b->calls == 2);
  step(0);  // b answered, so it takes expert 0's traffic again
  CHECK(b->calls == 3);
  CHECK(a->calls == 2);
}

namespace {

/// A host that never answers: its calls end only when abandoned, or after 10 s (a batch timeout).
struct hanging_channel final : sy::actors::expert_channel {
  struct pending {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<std::promise<caf::error>> done;
    void finish(caf::error e) {
      std::lock_guard lock(mu);
      if (done) done->set_value(std::move(e)), done.reset();
      cv.notify_all();
    }
  };
  std::shared_ptr<pending> p = std::make_shared<pending>();
  std::atomic<bool> abandoned{false};
  std::vector<std::thread> timers;
  ~hanging_channel() override {
    for (auto& t : timers) t.join();
  }
  caf::error call(int, uint64_t, std::span<const int>, std::span<const std::vector<float>* const>,
                  std::span<std::vector<float>* const>) override {
    return model::make_error(model::model_errc::io_error, "synchronous calls are not used here");
  }
  std::future<caf::error> call_async(int, uint64_t, std::span<const int>, std::span<const std::vector<float>* const>,
                                     std::span<std::vector<float>* const>) override {
    std::lock_guard lock(p->mu);
    p->done.emplace();
    auto f = p->done->get_future();
    timers.emplace_back([p = p] {
      {
        std::unique_lock wait(p->mu);
        if (p->cv.wait_for(wait, std::chrono::seconds(10), [&] { return !p->done; })) return;  // abandoned
      }
      p->finish(model::make_error(model::model_errc::io_error, "batch timeout"));
    });
    return f;
  }
  void abandon() override {
    abandoned = true;
    p->finish(model::make_error(model::model_errc::io_error, "link closed"));
  }
};

}  // namespace

TEST_CASE("cluster executor: calls to a host the coordinator marks down are abandoned, not waited out", "[actors]") {
  auto a = std::make_shared<counting_channel>();
  auto b = std::make_shared<hanging_channel>();
  sy::actors::cluster_executor exec([&](const sy::actors::host_info& h) -> std::shared_ptr<sy::actors::expert_channel> {
    if (h.id == 0) return a;
    return b;
  });
  std::vector<sy::actors::host_info> hosts = {{0, "a", "tcp://a", 8, true}, {1, "b", "tcp://b", 8, true}};
  sy::actors::placement_table p;
  p.epoch = 1, p.layers = 1, p.experts = 1, p.moe_layer = {true};
  p.table = {{{{1, 0, 1, 1.0, true}, {0, 1, 1, 0.0, true}}}};  // all of expert 0's rows to b
  REQUIRE(exec.update(p, hosts));
  model::dispatch_plan plan;
  plan.tokens = 2;
  plan.batches.push_back({0, {0, 1}, {1.0f, 1.0f}});
  std::vector<std::vector<float>> in{{1, 2, 3, 4}}, out{{0, 0, 0, 0}};
  exec.begin_step();
  auto step = std::async(std::launch::async, [&] { return exec.run(0, plan, in, out); });
  // b hangs; the coordinator's heartbeat marks it down under a new epoch.
  REQUIRE(step.wait_for(std::chrono::milliseconds(200)) == std::future_status::timeout);
  hosts[1].up = false;
  p.epoch = 2;
  REQUIRE(exec.update(p, hosts));
  auto err = step.get();
  exec.end_step();
  CHECK_FALSE(err);
  CHECK(b->abandoned);  // ended by the placement, not by its 10 s timeout
  CHECK(a->calls == 1);
  CHECK(out[0] == std::vector<float>{2, 4, 6, 8});
}
