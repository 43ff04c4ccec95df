// The cluster as separate processes on loopback: a coordinator, three expert hosts and a router
// (CAF's network layer for control, UCX for token batches), against transformers' greedy tokens,
// and with an expert-host process killed (SIGKILL) while requests run.
#include "model/safetensors.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <regex>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::json;

namespace {

std::filesystem::path fixture(const std::string& name) { return std::filesystem::path(SY_TEST_DATA) / "hf-tiny" / name; }

/// A child process running the switchyard binary, stdout captured; killed at scope exit.
class child {
 public:
  explicit child(std::vector<std::string> args) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(fds[1], STDOUT_FILENO);
      ::close(fds[0]);
      ::close(fds[1]);
      std::vector<char*> argv;
      std::string bin = SY_BINARY;
      argv.push_back(bin.data());
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::setenv("UCX_NET_DEVICES", "lo", 1);
      ::execv(bin.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = fds[0];
  }
  ~child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      for (int i = 0; i < 50 && ::waitpid(pid_, nullptr, WNOHANG) == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
  }
  /// Reads stdout until a line matches `re` (up to `timeout`); returns the first capture group.
  std::string wait_for(const std::regex& re, std::chrono::seconds timeout = std::chrono::seconds(30)) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      size_t nl;
      while ((nl = buf_.find('\n')) != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        std::smatch m;
        if (std::regex_search(line, m, re)) return m.size() > 1 ? m[1].str() : line;
      }
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, 100) > 0) {
        char b[1024];
        const ssize_t n = ::read(out_, b, sizeof b);
        if (n <= 0) break;
        buf_.append(b, static_cast<size_t>(n));
      }
    }
    FAIL("the child did not print what was expected in time");
    return {};
  }
  void kill_hard() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  /// SIGSTOP / SIGCONT: the process keeps its sockets open and answers nothing (a hung peer).
  void freeze() { REQUIRE(::kill(pid_, SIGSTOP) == 0); }
  void thaw() { REQUIRE(::kill(pid_, SIGCONT) == 0); }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buf_;
};

/// A loopback port below the kernel's ephemeral range (32768 and up here) that is free now. A
/// process restarted on a fixed port needs one: a port the kernel handed out for `:0` can be handed
/// to another test's process in the moment between the kill and the restart.
uint16_t unused_fixed_port() {
  for (int attempt = 0; attempt < 200; ++attempt) {
    const auto port = static_cast<uint16_t>(20000 + (static_cast<unsigned>(::getpid()) * 7919u + attempt * 104729u) % 12000u);
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    if (free) return port;
  }
  FAIL("no free loopback port in 20000-31999");
  return 0;
}

/// One request over a new loopback connection (Connection: close, so the answer ends with it):
/// {status, body}, or {0, ""} when the connection is refused or the answer cut short. A client
/// that waits forever would hang the test on a cluster that drops a request: 60 s at most.
std::pair<int, std::string> http_request(uint16_t port, const std::string& request) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval limit{60, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return {0, ""};
  }
  (void)::send(fd, request.data(), request.size(), 0);
  std::string resp;
  char b[4096];
  ssize_t n;
  while ((n = ::recv(fd, b, sizeof b, 0)) > 0) resp.append(b, static_cast<size_t>(n));
  ::close(fd);
  const auto split = resp.find("\r\n\r\n");
  if (resp.size() < 12 || split == std::string::npos) return {0, ""};
  return {std::stoi(resp.substr(9, 3)), resp.substr(split + 4)};
}

std::pair<int, std::string> http_post(uint16_t port, const std::string& body) {
  return http_request(port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " +
                                std::to_string(body.size()) + "\r\n\r\n" + body);
}

/// GET `path` with `headers` (each ending in CRLF).
std::pair<int, std::string> http_get(uint16_t port, const std::string& path, const std::string& headers = "") {
  return http_request(port, "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + "\r\n");
}

/// The value of an unlabelled counter in a Prometheus text page (-1 when absent).
double metric(const std::string& page, const std::string& name) {
  std::smatch m;
  if (std::regex_search(page, m, std::regex("(^|\n)" + name + " ([0-9.e+]+)"))) return std::stod(m[2].str());
  return -1;
}

struct reference {
  std::vector<std::vector<int32_t>> prompts, greedy;
};

reference read_reference(const std::string& name) {
  auto f = sy::model::safetensors_file::open(fixture(name) / "reference.safetensors");
  REQUIRE(f);
  auto ids = *sy::model::read_i64(*(*f)->find("input_ids"));
  auto greedy = *sy::model::read_i64(*(*f)->find("greedy_ids"));
  const auto t = (*f)->find("input_ids")->shape[1], g = (*f)->find("greedy_ids")->shape[1];
  reference r;
  for (int64_t b = 0; b < 2; ++b) {
    r.prompts.emplace_back(ids.begin() + b * t, ids.begin() + (b + 1) * t);
    r.greedy.emplace_back(greedy.begin() + b * g + t, greedy.begin() + (b + 1) * g);
  }
  return r;
}

struct cluster {
  std::unique_ptr<child> coordinator, router;
  std::vector<std::unique_ptr<child>> hosts;
  uint16_t http = 0;
};

cluster start_cluster(const std::string& model, int hosts, int replicas, const std::vector<std::string>& router_flags = {}) {
  cluster c;
  const std::string m = fixture(model).string();
  c.coordinator = std::make_unique<child>(std::vector<std::string>{"coordinator", "--listen", "127.0.0.1:0", "--model", m,
                                                                   "--hosts", std::to_string(hosts), "--replicas",
                                                                   std::to_string(replicas)});
  const std::string cport = c.coordinator->wait_for(std::regex("coordinator listening on [^:]+:(\\d+)"));
  for (int h = 0; h < hosts; ++h) {
    c.hosts.push_back(std::make_unique<child>(std::vector<std::string>{"expert-host", "--coordinator", "127.0.0.1:" + cport,
                                                                       "--model", m, "--slots", "64", "--threads", "1",
                                                                       "--name", "host" + std::to_string(h)}));
    c.hosts.back()->wait_for(std::regex("expert host serving"));
  }
  std::vector<std::string> router_args{"router", "--coordinator", "127.0.0.1:" + cport, "--model", m, "--http", "127.0.0.1:0",
                                       "--threads", "1",
                                       // every step of two or more sequences in ping-pong
                                       "--micro-batch-min-rows", "1"};
  router_args.insert(router_args.end(), router_flags.begin(), router_flags.end());
  c.router = std::make_unique<child>(router_args);
  c.http = static_cast<uint16_t>(std::stoi(c.router->wait_for(std::regex("router serving HTTP on [^:]+:(\\d+)"))));
  // Ready once every expert has a ready replica.
  for (int i = 0; i < 300; ++i) {
    if (http_get(c.http, "/readyz").first == 200) return c;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL("the cluster did not become ready");
  return c;
}

/// 12 concurrent clients, each asking for 64 tokens of one of the two reference prompts (k % 2).
std::vector<std::future<std::pair<int, std::string>>> start_requests(const cluster& c, const reference& ref) {
  std::vector<std::future<std::pair<int, std::string>>> calls;
  for (int k = 0; k < 12; ++k)
    calls.push_back(std::async(std::launch::async, [&c, &ref, k] {
      return http_post(c.http, json{{"prompt", ref.prompts[static_cast<size_t>(k % 2)]}, {"max_tokens", 64}}.dump());
    }));
  return calls;
}

std::vector<std::pair<int, std::string>> collect(std::vector<std::future<std::pair<int, std::string>>>& calls) {
  std::vector<std::pair<int, std::string>> answers;
  for (auto& f : calls) answers.push_back(f.get());
  return answers;
}

/// Every answer is a 200 with 64 tokens whose first 8 are the reference's (what it covers), and
/// all 64 equal those of a request made now, on the cluster as it is after the fault.
void check_answers(const cluster& c, const reference& ref, const std::vector<std::pair<int, std::string>>& answers) {
  std::vector<std::vector<int32_t>> got(answers.size());
  for (size_t k = 0; k < answers.size(); ++k) {
    INFO("request " << k << ": " << answers[k].second);
    REQUIRE(answers[k].first == 200);
    got[k] = json::parse(answers[k].second)["choices"][0]["token_ids"].get<std::vector<int32_t>>();
    REQUIRE(got[k].size() == 64);
    CHECK(std::vector<int32_t>(got[k].begin(), got[k].begin() + 8) == ref.greedy[k % 2]);
  }
  for (size_t i = 0; i < 2; ++i) {
    auto [st, body] = http_post(c.http, json{{"prompt", ref.prompts[i]}, {"max_tokens", 64}}.dump());
    REQUIRE(st == 200);
    auto now = json::parse(body)["choices"][0]["token_ids"].get<std::vector<int32_t>>();
    for (size_t k = 0; k < answers.size(); ++k)
      if (k % 2 == i) CHECK(got[k] == now);
  }
}

}  // namespace

TEST_CASE("multi-process: coordinator + 3 expert hosts + router on loopback answer the reference tokens", "[multiprocess]") {
  for (auto name : {"mixtral_e8k2", "deepseekv3_e16k4"}) {
    INFO(name);
    auto ref = read_reference(name);
    auto c = start_cluster(name, 3, 1);
    auto [st, body] = http_post(c.http, json{{"prompt", ref.prompts}, {"max_tokens", ref.greedy[0].size()}}.dump());
    REQUIRE(st == 200);
    auto j = json::parse(body);
    for (size_t i = 0; i < 2; ++i) CHECK(j["choices"][i]["token_ids"].get<std::vector<int32_t>>() == ref.greedy[i]);
    for (size_t i = 0; i < 2; ++i) {
      auto [s1, b1] = http_post(c.http, json{{"prompt", ref.prompts[i]}, {"max_tokens", ref.greedy[i].size()}}.dump());
      REQUIRE(s1 == 200);
      CHECK(json::parse(b1)["choices"][0]["token_ids"].get<std::vector<int32_t>>() == ref.greedy[i]);
    }
  }
}

TEST_CASE("multi-process: an expert host killed with SIGKILL mid-run loses no request (2 replicas)", "[multiprocess]") {
  auto ref = read_reference("qwen3moe_e16k4");
  auto c = start_cluster("qwen3moe_e16k4", 3, 2);
  auto calls = start_requests(c, ref);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  c.hosts[1]->kill_hard();
  check_answers(c, ref, collect(calls));  // the answers made now come from the survivors
}

TEST_CASE("multi-process: an expert host that hangs (SIGSTOP) mid-run loses no request (2 replicas)", "[multiprocess]") {
  // Unlike a killed process, a hung one keeps its connections open: nothing fails fast. The
  // coordinator's heartbeat marks it down (1.5 s), the router then abandons the calls in flight to
  // it, before its batch timeout (5 s), and sends their rows elsewhere.
  auto ref = read_reference("qwen3moe_e16k4");
  auto c = start_cluster("qwen3moe_e16k4", 3, 2);
  auto calls = start_requests(c, ref);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  c.hosts[1]->freeze();
  check_answers(c, ref, collect(calls));  // the answers made now come while the host is still hung
  c.hosts[1]->thaw();
}

TEST_CASE("multi-process: an expert host that stalls on and off (a slow peer) changes no answer (2 replicas)", "[multiprocess]") {
  // Stopped 400 ms of every 500 while requests run: some of its answers come after the router's
  // 300 ms batch timeout, when their rows have gone to the other replica; those late replies must
  // be dropped, not taken for another batch's.
  auto ref = read_reference("qwen3moe_e16k4");
  auto c = start_cluster("qwen3moe_e16k4", 3, 2, {"--batch-timeout-ms", "300"});
  std::atomic<bool> stalling{true};
  std::thread staller([&] {
    while (stalling) {
      c.hosts[1]->freeze();
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
      c.hosts[1]->thaw();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  auto calls = start_requests(c, ref);
  auto answers = collect(calls);
  stalling = false;
  staller.join();
  // The stalls did cost batches their answers: rows went to the other replica.
  CHECK(metric(http_get(c.http, "/metrics").second, "switchyard_router_batch_retries_total") > 0);
  check_answers(c, ref, answers);
}

TEST_CASE("multi-process: a rebalance (switchyard ctl rebalance) while requests run loses none and changes no answer", "[multiprocess]") {
  ::setenv("SWITCHYARD_ADMIN_TOKEN", "multiprocess-test-token", 1);  // inherited by the router and ctl
  auto ref = read_reference("qwen3moe_e16k4");
  auto c = start_cluster("qwen3moe_e16k4", 3, 1);
  auto calls = start_requests(c, ref);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  child ctl({"ctl", "rebalance", "--router", "127.0.0.1:" + std::to_string(c.http)});
  const std::string status = ctl.wait_for(std::regex("\"status\": \"([a-z]+)\""));
  CHECK(status == "done");
  check_answers(c, ref, collect(calls));  // the answers made now run on the new placement
  ::unsetenv("SWITCHYARD_ADMIN_TOKEN");
}

namespace {

/// GET /admin/cluster from the router (admin token from the environment).
json cluster_state(uint16_t port) {
  auto [status, body] =
      http_get(port, "/admin/cluster", std::string("Authorization: Bearer ") + std::getenv("SWITCHYARD_ADMIN_TOKEN") + "\r\n");
  return status == 200 ? json::parse(body, nullptr, false) : json{};
}

}  // namespace

TEST_CASE("multi-process: the coordinator killed and restarted from its state file, serving never stops", "[multiprocess]") {
  ::setenv("SWITCHYARD_ADMIN_TOKEN", "multiprocess-test-token", 1);
  auto ref = read_reference("mixtral_e8k2");
  const std::string m = fixture("mixtral_e8k2").string();
  const std::string state = (std::filesystem::temp_directory_path() / ("sy-coord-state-" + std::to_string(::getpid()) + ".json")).string();
  std::filesystem::remove(state);
  // A fixed port outside the ephemeral range: the restarted coordinator takes it again, and no
  // other test's process can have been given it meanwhile (their routers would answer for ours).
  const std::string fixed = std::to_string(unused_fixed_port());
  auto coordinator = std::make_unique<child>(std::vector<std::string>{"coordinator", "--listen", "127.0.0.1:" + fixed, "--model", m,
                                                                      "--hosts", "3", "--state", state});
  const std::string cport = coordinator->wait_for(std::regex("coordinator listening on [^:]+:(\\d+)"));
  REQUIRE(cport == fixed);
  std::vector<std::unique_ptr<child>> hosts;
  for (int h = 0; h < 3; ++h)
    hosts.push_back(std::make_unique<child>(std::vector<std::string>{"expert-host", "--coordinator", "127.0.0.1:" + cport, "--model", m,
                                                                     "--slots", "64", "--threads", "1", "--name", "host" + std::to_string(h)}));
  child router({"router", "--coordinator", "127.0.0.1:" + cport, "--model", m, "--http", "127.0.0.1:0", "--threads", "1",
                "--micro-batch-min-rows", "1"});  // every step of two or more sequences in ping-pong
  const auto port = static_cast<uint16_t>(std::stoi(router.wait_for(std::regex("router serving HTTP on [^:]+:(\\d+)"))));
  auto ask = [&] {
    auto [st, body] = http_post(port, json{{"prompt", ref.prompts}, {"max_tokens", ref.greedy[0].size()}}.dump());
    REQUIRE(st == 200);
    auto j = json::parse(body);
    for (size_t i = 0; i < 2; ++i) CHECK(j["choices"][i]["token_ids"].get<std::vector<int32_t>>() == ref.greedy[i]);
  };
  for (int i = 0; i < 300 && http_post(port, json{{"prompt", json::array({1})}, {"max_tokens", 1}}.dump()).first != 200; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ask();
  const auto before = cluster_state(port);
  REQUIRE(before.contains("epoch"));
  REQUIRE(std::filesystem::exists(state));

  coordinator->kill_hard();
  coordinator.reset();
  ask();  // the data plane does not need the coordinator

  coordinator = std::make_unique<child>(std::vector<std::string>{"coordinator", "--listen", "127.0.0.1:" + cport, "--model", m,
                                                                  "--hosts", "3", "--state", state});
  REQUIRE(coordinator->wait_for(std::regex("coordinator listening on [^:]+:(\\d+)")) == cport);  // bound again
  // Hosts and router reconnect; the recovered placement comes back under a newer epoch.
  json after;
  for (int i = 0; i < 200; ++i) {
    after = cluster_state(port);
    if (after.contains("epoch") && after["epoch"].get<uint64_t>() > before["epoch"].get<uint64_t>()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(after.contains("epoch"));
  CHECK(after["epoch"].get<uint64_t>() > before["epoch"].get<uint64_t>());
  REQUIRE(after["hosts"].size() == 3);
  for (auto& h : after["hosts"]) CHECK(h["up"] == true);
  CHECK(after["layers"] == before["layers"]);  // the same replicas where they were
  ask();
  // The new coordinator runs the cluster: a rebalance round goes through it.
  child ctl({"ctl", "rebalance", "--router", "127.0.0.1:" + std::to_string(port)});
  const std::string status = ctl.wait_for(std::regex("\"status\": \"([a-z]+)\""));
  CHECK((status == "done" || status == "skipped"));
  ask();
  std::filesystem::remove(state);
  ::unsetenv("SWITCHYARD_ADMIN_TOKEN");
}
