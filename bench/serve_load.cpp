// Load generator for /v1/completions: C clients, each sending requests back to back (one connection
// per request), random token-id prompts. Reports output tokens/s and, from the server's timings,
// time to first token and time per output token (p50, p99).
//
//   serve_load --port P [--host 127.0.0.1] [--concurrency 1,8,32,128] [--seconds 20]
//              [--prompt-tokens 64] [--max-tokens 64] [--vocab 1024] [--label NAME]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::json;
using clk = std::chrono::steady_clock;

namespace {

struct args {
  std::string host = "127.0.0.1";
  int port = 0;
  std::vector<int> concurrency{1, 8, 32, 128};
  double seconds = 20;
  int prompt_tokens = 64, max_tokens = 64, vocab = 1024;
  std::string label = "serve";
};

bool post(const args& a, const std::string& body, std::string& out) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(a.port));
  inet_pton(AF_INET, a.host.c_str(), &addr.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return false;
  }
  std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                    "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  if (::send(fd, req.data(), req.size(), 0) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return false;
  }
  out.clear();
  char buf[8192];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out.size() > 12 && out.compare(9, 3, "200") == 0;
}

double pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--host") a.host = v;
    else if (k == "--port") a.port = std::stoi(v);
    else if (k == "--seconds") a.seconds = std::stod(v);
    else if (k == "--prompt-tokens") a.prompt_tokens = std::stoi(v);
    else if (k == "--max-tokens") a.max_tokens = std::stoi(v);
    else if (k == "--vocab") a.vocab = std::stoi(v);
    else if (k == "--label") a.label = v;
    else if (k == "--concurrency") {
      a.concurrency.clear();
      std::stringstream ss(v);
      std::string c;
      while (std::getline(ss, c, ',')) a.concurrency.push_back(std::stoi(c));
    }
  }
  if (a.port <= 0) {
    std::fprintf(stderr, "usage: serve_load --port P [...]\n");
    return 2;
  }
  std::printf("%-10s %5s %9s %7s %12s %10s %10s %10s %10s\n", "server", "conc", "requests", "errors", "out tok/s",
              "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99");
  for (int conc : a.concurrency) {
    std::mutex mu;
    std::vector<double> ttft, tpot;
    std::atomic<int64_t> tokens{0}, requests{0}, errors{0};
    const auto start = clk::now();
    const auto until = start + std::chrono::duration<double>(a.seconds);
    std::vector<std::thread> clients;
    for (int c = 0; c < conc; ++c)
      clients.emplace_back([&, c] {
        std::mt19937 rng(static_cast<uint32_t>(c + 1));
        std::uniform_int_distribution<int> tok(0, a.vocab - 1);
        std::string resp;
        while (clk::now() < until) {
          std::vector<int> prompt(static_cast<size_t>(a.prompt_tokens));
          for (auto& t : prompt) t = tok(rng);
          json body = {{"prompt", prompt}, {"max_tokens", a.max_tokens}};
          if (!post(a, body.dump(), resp)) {
            ++errors;
            continue;
          }
          auto j = json::parse(resp.substr(resp.find("\r\n\r\n") + 4), nullptr, false);
          if (j.is_discarded()) {
            ++errors;
            continue;
          }
          const int64_t n = j["usage"]["completion_tokens"].get<int64_t>();
          const double first = j["timing"]["first_token_ms"].get<double>(), total = j["timing"]["total_ms"].get<double>();
          tokens += n;
          ++requests;
          std::lock_guard lock(mu);
          ttft.push_back(first);
          if (n > 1) tpot.push_back((total - first) / static_cast<double>(n - 1));
        }
      });
    for (auto& t : clients) t.join();
    const double secs = std::chrono::duration<double>(clk::now() - start).count();
    std::printf("%-10s %5d %9lld %7lld %12.1f %10.1f %10.1f %10.2f %10.2f\n", a.label.c_str(), conc,
                static_cast<long long>(requests.load()), static_cast<long long>(errors.load()),
                static_cast<double>(tokens.load()) / secs, pct(ttft, 0.5), pct(ttft, 0.99), pct(tpot, 0.5), pct(tpot, 0.99));
    std::fflush(stdout);
  }
  std::printf("(TTFT and TPOT in ms, from the server's timings; out tok/s counted by the clients)\n");
  return 0;
}
