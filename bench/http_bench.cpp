// The HTTP layer alone: requests/s and latency of our server (api::http_server) next to a minimal
// Boost.Beast server built into this binary with the same threading (one I/O thread, an async
// session per connection, keep-alive), driven by the same closed-loop clients (keep-alive
// connections, one request in flight each). The minimal server answers fixed bytes: it is the limit
// of the layer. Ours runs its whole path — routing, JSON parsing and validation, the batcher
// callback, the JSON answer — with a completion service that answers at once (max_tokens 1, no
// model), so what is measured is the HTTP layer. Target: ours ≥ 70 % of the minimal server.
// With --model DIR it also runs the same completions request on our server in front of an
// embedded cluster serving that model (max_tokens 1: one prefill and one sampled token), to show
// how much of a tiny model's request the HTTP layer is.
//   bench_http [--seconds S] [--connections C] [--model DIR]
#include "actors/embedded_cluster.hpp"
#include "api/http_server.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/beast.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using namespace sy;

namespace {

// ---- the minimal server: fixed answers, same session structure as ours ------------------------

class mini_session : public std::enable_shared_from_this<mini_session> {
 public:
  explicit mini_session(tcp::socket s) : stream_(std::move(s)) {}
  void read() {
    req_ = {};
    http::async_read(stream_, buf_, req_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return;
      self->answer();
    });
  }

 private:
  void answer() {
    auto res = std::make_shared<http::response<http::string_body>>(http::status::ok, 11);
    res->set(http::field::content_type, "application/json");
    res->keep_alive(req_.keep_alive());
    res->body() = req_.target() == "/healthz"
                      ? R"({"status":"ok"})"
                      : R"({"id":"cmpl-1","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":"","token_ids":[7],"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}})";
    res->prepare_payload();
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec || !res->keep_alive()) return;
      self->read();
    });
  }
  beast::tcp_stream stream_;
  beast::flat_buffer buf_;
  http::request<http::string_body> req_;
};

struct mini_server {
  net::io_context io;
  tcp::acceptor acc{io, {net::ip::make_address("127.0.0.1"), 0}};
  std::thread thread;
  void accept() {
    acc.async_accept(net::make_strand(io), [this](beast::error_code ec, tcp::socket s) {
      if (ec) return;
      std::make_shared<mini_session>(std::move(s))->read();
      accept();
    });
  }
  uint16_t start() {
    accept();
    thread = std::thread([this] { io.run(); });
    return acc.local_endpoint().port();
  }
  ~mini_server() {
    io.stop();
    if (thread.joinable()) thread.join();
  }
};

// ---- closed-loop clients ----------------------------------------------------------------------

struct result {
  double rps = 0, p50_us = 0, p99_us = 0;
  long errors = 0;
};

result drive(uint16_t port, const std::string& request, int connections, double seconds) {
  std::atomic<bool> stop{false};
  std::vector<std::vector<double>> lat(static_cast<size_t>(connections));
  std::vector<long> errors(static_cast<size_t>(connections), 0);
  std::vector<std::thread> ts;
  for (int c = 0; c < connections; ++c)
    ts.emplace_back([&, c] {
      int fd = ::socket(AF_INET, SOCK_STREAM, 0);
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(port);
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
        ++errors[static_cast<size_t>(c)];
        return;
      }
      std::string buf;
      char tmp[16384];
      while (!stop) {
        const auto t0 = std::chrono::steady_clock::now();
        if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) break;
        // Read one response: head, then Content-Length bytes.
        buf.clear();
        size_t need = std::string::npos;
        while (true) {
          const ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
          if (n <= 0) {
            need = 0;
            ++errors[static_cast<size_t>(c)];
            break;
          }
          buf.append(tmp, static_cast<size_t>(n));
          const auto he = buf.find("\r\n\r\n");
          if (he == std::string::npos) continue;
          if (need == std::string::npos) {
            auto cl = buf.find("Content-Length: ");
            if (cl == std::string::npos) cl = buf.find("content-length: ");
            need = he + 4 + (cl == std::string::npos ? 0 : std::stoul(buf.substr(cl + 16)));
          }
          if (buf.size() >= need) break;
        }
        if (need == 0) break;
        if (buf.compare(9, 3, "200") != 0) ++errors[static_cast<size_t>(c)];
        lat[static_cast<size_t>(c)].push_back(
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      ::close(fd);
    });
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : ts) t.join();
  std::vector<double> all;
  result r;
  for (size_t c = 0; c < lat.size(); ++c) {
    all.insert(all.end(), lat[c].begin(), lat[c].end());
    r.errors += errors[c];
  }
  std::sort(all.begin(), all.end());
  r.rps = static_cast<double>(all.size()) / seconds;
  if (!all.empty()) {
    r.p50_us = all[all.size() / 2];
    r.p99_us = all[std::min(all.size() - 1, all.size() * 99 / 100)];
  }
  return r;
}

std::string make_request(const std::string& method, const std::string& path, const std::string& body) {
  return method + " " + path + " HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 5;
  int connections = 8;
  std::string model;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--seconds") == 0) seconds = std::stod(argv[i + 1]);
    if (std::strcmp(argv[i], "--connections") == 0) connections = std::stoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--model") == 0) model = argv[i + 1];
  }
  // Our server with a completion service that answers at once from its own "engine" thread.
  api::completion_service svc;
  svc.model_name = "m";
  svc.vocab_size = 512;
  svc.max_context = 4096;
  svc.ready = [] { return true; };
  svc.submit = [](scheduler::generation_request r) -> caf::error {
    scheduler::token_event ev{7, 0, 0.0f, nullptr};
    if (r.on_token) r.on_token(ev);
    scheduler::completion c;
    c.id = r.id;
    c.tokens = {7};
    c.finish_reason = "length";
    c.prompt_tokens = static_cast<int64_t>(r.prompt.size());
    r.on_done(std::move(c));
    return {};
  };
  api::http_config hc;
  hc.threads = 1;
  hc.max_connections = 4096;
  auto ours = api::http_server::start(hc, svc);
  if (!ours) {
    std::fprintf(stderr, "cannot start the server\n");
    return 1;
  }
  mini_server mini;
  const uint16_t mini_port = mini.start();
  const uint16_t our_port = (*ours)->port();

  struct route {
    const char* name;
    std::string req;
  };
  const route routes[] = {
      {"GET /healthz", make_request("GET", "/healthz", "")},
      {"POST /v1/completions (max_tokens 1)", make_request("POST", "/v1/completions", R"({"prompt":[1,2,3],"max_tokens":1})")},
  };
  std::printf("%d keep-alive connections, %.0f s per run, one I/O thread per server\n", connections, seconds);
  std::printf("%-38s %-8s %12s %10s %10s %8s\n", "route", "server", "requests/s", "p50 us", "p99 us", "errors");
  for (const auto& rt : routes) {
    auto m = drive(mini_port, rt.req, connections, seconds);
    auto o = drive(our_port, rt.req, connections, seconds);
    std::printf("%-38s %-8s %12.0f %10.1f %10.1f %8ld\n", rt.name, "minimal", m.rps, m.p50_us, m.p99_us, m.errors);
    std::printf("%-38s %-8s %12.0f %10.1f %10.1f %8ld\n", rt.name, "ours", o.rps, o.p50_us, o.p99_us, o.errors);
    std::printf("%-38s ratio ours/minimal: %.2f requests/s (target >= 0.70), p99 %.2fx\n\n", "", m.rps > 0 ? o.rps / m.rps : 0,
                m.p99_us > 0 ? o.p99_us / m.p99_us : 0);
  }
  (*ours)->stop();
  if (!model.empty()) {
    actors::embedded_config ec;
    ec.model = model;
    ec.hosts = 2;
    auto cluster = actors::embedded_cluster::start(ec);
    if (!cluster || !(*cluster)->wait_ready(std::chrono::seconds(60))) {
      std::fprintf(stderr, "cannot start the embedded cluster on %s\n", model.c_str());
      return 1;
    }
    auto* c = cluster->get();
    api::completion_service real;
    real.model_name = "m";
    real.vocab_size = c->config().vocab_size;
    real.max_context = c->config().max_position_embeddings;
    real.ready = [c] { return c->ready(); };
    real.submit = [c](scheduler::generation_request r) { return c->submit(std::move(r)); };
    auto server = api::http_server::start(hc, real);
    if (!server) return 1;
    auto r = drive((*server)->port(), routes[1].req, connections, seconds);
    std::printf("%-38s %-8s %12.0f %10.1f %10.1f %8ld\n", "POST /v1/completions (max_tokens 1)", "ours+model", r.rps, r.p50_us,
                r.p99_us, r.errors);
    std::printf("(the same request answered by the embedded cluster on %s)\n", model.c_str());
    (*server)->stop();
    c->shutdown();
  }
  return 0;
}
