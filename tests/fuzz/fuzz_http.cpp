// Fuzz target: the HTTP request path, Boost.Beast's request parser and our handler
// (api/http_server.cpp), over a real loopback connection.
//
// LLVMFuzzerInitialize starts one api::http_server on 127.0.0.1 with small limits and short timeouts
// and a fake serving core: model "fuzz-model", vocabulary 512, context 256, always ready, the
// bytefallback_bpe fixture tokenizer, an admin token, rebalance and cluster-state hooks and a
// cluster view for /dashboard/data. Its `submit` answers at
// once: a few tokens taken from the prompt (with log-probabilities when asked), then `on_done` —
// inline (from inside submit) when the request's sampling seed is even, from an engine thread of
// its own when it is odd, so both orders of the I/O and engine threads are tried. Some max_tokens
// values stand for the engine's other answers: 12 refuses every choice after the first (queue
// full), 13 refuses every choice (queue full), 14 refuses as an invalid request, 15 ends each
// choice with a scheduler error (503), 17 with a model error (500).
//
// Each input is a byte stream a client sends; it is sent twice:
//   1. write everything, shut down the write side at once, read until the server closes (a client
//      that leaves right after sending);
//   2. write everything, read until the server has answered every complete request in the input
//      (or closed), then shut down the write side and read until it closes (a patient client).
// A connection the server has not closed after 5 s is a hang (abort). What comes back is checked:
// a sequence of complete HTTP/1.1 responses (a response to HEAD has no body), nothing after one that
// says `Connection: close`, known status codes only, JSON bodies that parse, error bodies of the
// documented shape, and event streams made of `data:` events, each JSON or `[DONE]`, with
// `[DONE]` once and last; and once both connections are closed, no completion request stays counted
// as active (graceful drain waits for that count). The requests in the input are parsed here too, by a Beast parser with the
// server's limits, to know which responses answer HEAD and how many answers to wait for.
#include "fuzz_util.hpp"

#include "api/http_server.hpp"
#include "model/error.hpp"
#include "model/tokenizer.hpp"
#include "scheduler/batcher.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace sy;
namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using json = nlohmann::json;

constexpr size_t max_header_bytes = 2048;
constexpr size_t max_body_bytes = 8192;

// ---- the fake serving core ------------------------------------------------------------------

/// Generates a request's tokens at once: up to 6, cycling through its prompt.
void generate(scheduler::generation_request& r) {
  scheduler::completion c;
  c.id = r.id;
  c.prompt_tokens = static_cast<int64_t>(r.prompt.size());
  if (r.max_tokens == 15 || r.max_tokens == 17) {
    c.finish_reason = "error";
    c.error = r.max_tokens == 15 ? scheduler::make_error(scheduler::scheduler_errc::shutting_down, "the engine stopped")
                                 : model::make_error(model::model_errc::bad_value, "the engine failed \xff");
    r.on_done(std::move(c));
    return;
  }
  c.finish_reason = "length";
  const int n = std::min(r.max_tokens, 6);
  std::vector<std::pair<int32_t, float>> top;
  for (int i = 0; i < n; ++i) {
    if (r.cancel && r.cancel->load()) {
      c.finish_reason = "cancelled";
      break;
    }
    const int32_t tok = r.prompt[static_cast<size_t>(i) % r.prompt.size()];
    c.tokens.push_back(tok);
    scheduler::token_event ev;
    ev.token = tok;
    ev.index = static_cast<size_t>(i);
    if (r.logprobs >= 0) {
      ev.logprob = -0.25f * static_cast<float>(i + 1);
      top.clear();
      for (int k = 0; k < r.logprobs; ++k) top.emplace_back((tok + k) % 512, -0.5f * static_cast<float>(k + 1));
      c.token_logprobs.push_back(ev.logprob);
      c.top_logprobs.push_back(top);
      ev.top = &top;
    }
    const bool go_on = !r.on_token || r.on_token(ev);
    const bool stop_id = std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), tok) != r.stop_token_ids.end();
    if (!go_on || stop_id) {
      c.finish_reason = "stop";
      break;
    }
  }
  c.first_token_ms = 1;
  c.total_ms = 2;
  r.on_done(std::move(c));
}

class fake_engine {
 public:
  fake_engine() : thread_([this] { loop(); }) {}

  caf::error submit(scheduler::generation_request r) {
    const uint64_t choice = r.id % 1000;
    if (r.max_tokens == 13 || (r.max_tokens == 12 && choice > 0))
      return scheduler::make_error(scheduler::scheduler_errc::queue_full, "the queue is full");
    if (r.max_tokens == 14) return scheduler::make_error(scheduler::scheduler_errc::invalid_request, "refused \xc3");
    if (r.sampling.seed % 2 == 0) {
      generate(r);
      return {};
    }
    {
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(r));
    }
    cv_.notify_one();
    return {};
  }

 private:
  void loop() {
    for (;;) {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return !queue_.empty(); });
      auto r = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      generate(r);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<scheduler::generation_request> queue_;
  std::thread thread_;
};

uint16_t server_port = 0;
api::http_server* server_ptr = nullptr;  // never stopped: the process ends with it

void start_server() {
  auto tok = model::tokenizer::load(std::filesystem::path(SY_TEST_DATA) / "tokenizers" / "bytefallback_bpe" / "tokenizer.json");
  SY_FUZZ_CHECK(static_cast<bool>(tok), "cannot load the tokenizer fixture: %s", model::describe(tok.error()).c_str());
  auto* engine = new fake_engine;  // lives as long as the process, as the server does
  api::completion_service svc;
  svc.model_name = "fuzz-model";
  svc.vocab_size = 512;
  svc.max_context = 256;
  svc.ready = [] { return true; };
  svc.tokenizer = std::make_shared<const model::tokenizer>(std::move(*tok));
  svc.submit = [engine](scheduler::generation_request r) { return engine->submit(std::move(r)); };
  svc.rebalance = []() -> caf::expected<std::string> { return std::string(R"({"moves":0})"); };
  svc.cluster_state = [] { return std::string(R"({"epoch":1,"hosts":[]})"); };
  svc.cluster = [] {
    api::cluster_view v;
    v.epoch = 3;
    v.hosts = v.hosts_up = 2;
    v.layers = {1, 2};
    v.experts = 4;
    v.replicas.assign(8, 1);
    return v;
  };
  api::http_config cfg;
  cfg.host = "127.0.0.1";
  cfg.port = 0;
  cfg.threads = 1;
  cfg.max_body_bytes = max_body_bytes;
  cfg.max_header_bytes = max_header_bytes;
  cfg.header_timeout = std::chrono::milliseconds(200);
  cfg.body_timeout = std::chrono::milliseconds(200);
  cfg.idle_timeout = std::chrono::milliseconds(200);
  cfg.max_prompt_tokens = 128;
  cfg.max_tokens = 64;
  cfg.max_choices = 8;
  cfg.admin_token = "fuzz-admin-token";
  auto server = api::http_server::start(cfg, std::move(svc));
  SY_FUZZ_CHECK(static_cast<bool>(server), "cannot start the server: %s", model::describe(server.error()).c_str());
  server_port = (*server)->port();
  server_ptr = server->release();
}

// ---- what the input asks, as the server's parser sees it ------------------------------------

struct request_plan {
  std::vector<bool> head;  ///< per complete request: is it HEAD
  size_t answers = 0;      ///< responses a patient client waits for
};

request_plan plan(std::string_view in) {
  request_plan out;
  size_t off = 0;
  for (;;) {
    http::request_parser<http::string_body> p;
    p.header_limit(static_cast<std::uint32_t>(max_header_bytes));
    p.body_limit(max_body_bytes);
    p.eager(true);
    beast::error_code ec;
    while (off < in.size() && !p.is_done()) {
      const size_t used = p.put(net::buffer(in.data() + off, in.size() - off), ec);
      off += used;
      if (ec == http::error::need_more) {
        ec = {};
        if (used == 0) break;
        continue;
      }
      if (ec) break;
    }
    if (ec == http::error::header_limit || ec == http::error::body_limit) {
      ++out.answers;  // 431 / 413, then close
      out.head.push_back(false);
      return out;
    }
    if (ec || !p.is_done()) return out;
    out.head.push_back(p.get().method() == http::verb::head);
    ++out.answers;
    if (!p.get().keep_alive()) return out;
  }
}

// ---- what comes back --------------------------------------------------------------------------

class response_checker {
 public:
  explicit response_checker(const request_plan& p) : plan_(p) {}

  /// Parses and checks every complete response in `bytes` (appended to what came before).
  void feed(std::string_view bytes) {
    pending_.append(bytes);
    for (;;) {
      if (!parser_) {
        if (pending_.empty()) return;
        SY_FUZZ_CHECK(!closed_, "bytes after a response that said Connection: close: %.80s", pending_.c_str());
        parser_.emplace();
        parser_->header_limit(1 << 16);
        parser_->body_limit(boost::none);
        parser_->eager(true);
        if (done_ < plan_.head.size() && plan_.head[done_]) parser_->skip(true);
      }
      beast::error_code ec;
      size_t used = 0;
      while (!pending_.empty() && !parser_->is_done()) {
        const size_t n = parser_->put(net::buffer(pending_.data() + used, pending_.size() - used), ec);
        used += n;
        if (ec == http::error::need_more) {
          ec = {};
          if (n == 0 || used == pending_.size()) break;
          continue;
        }
        if (ec) break;
        if (used == pending_.size()) break;
      }
      SY_FUZZ_CHECK(!ec, "the server sent a malformed response (%s): %.200s", ec.message().c_str(), pending_.c_str());
      pending_.erase(0, used);
      if (!parser_->is_done()) return;
      check(parser_->release());
      parser_.reset();
      ++done_;
    }
  }

  /// At the server's close: no half response may be left.
  void eof() const {
    SY_FUZZ_CHECK(!parser_ && pending_.empty(), "the connection closed inside a response: %.200s", pending_.c_str());
  }

  [[nodiscard]] size_t responses() const { return done_; }

 private:
  void check(const http::response<http::string_body>& r) {
    static const std::set<unsigned> known = {200, 400, 401, 404, 405, 408, 413, 431, 500, 501, 503};
    const unsigned code = r.result_int();
    SY_FUZZ_CHECK(r.version() == 11, "response version %u", r.version());
    SY_FUZZ_CHECK(known.count(code) == 1, "unexpected status %u", code);
    if (!r.keep_alive()) closed_ = true;
    const bool head = done_ < plan_.head.size() && plan_.head[done_];
    if (head) return;
    const std::string type(r[http::field::content_type]);
    const std::string& body = r.body();
    // One connection at a time: refusing one for the connection limit means sessions leaked.
    SY_FUZZ_CHECK(body.find("too many connections") == std::string::npos, "sessions leaked: the connection limit was reached");
    if (type == "application/json") {
      const json j = json::parse(body, nullptr, false);
      SY_FUZZ_CHECK(!j.is_discarded() && j.is_object(), "a %u response whose body is not a JSON object: %.200s", code, body.c_str());
      if (code >= 400) check_error(j, body);
    } else if (type.starts_with("text/plain") || type.starts_with("text/html")) {
      SY_FUZZ_CHECK(code == 200, "a %u response of content type '%s'", code, type.c_str());  // /metrics, /dashboard
    } else if (type == "text/event-stream") {
      SY_FUZZ_CHECK(code == 200, "an event stream with status %u", code);
      size_t at = 0;
      bool finished = false;
      while (at < body.size()) {
        SY_FUZZ_CHECK(!finished, "an event after [DONE]: %.200s", body.c_str() + at);
        SY_FUZZ_CHECK(body.compare(at, 6, "data: ") == 0, "an event that is not `data: `: %.200s", body.c_str() + at);
        const size_t end = body.find("\n\n", at);
        SY_FUZZ_CHECK(end != std::string::npos, "an unterminated event: %.200s", body.c_str() + at);
        const std::string data = body.substr(at + 6, end - at - 6);
        if (data == "[DONE]") {
          finished = true;
        } else {
          const json j = json::parse(data, nullptr, false);
          SY_FUZZ_CHECK(!j.is_discarded() && j.is_object(), "an event that is not a JSON object: %.200s", data.c_str());
          if (j.contains("error")) check_error(j, data);
        }
        at = end + 2;
      }
      SY_FUZZ_CHECK(finished, "an event stream without [DONE]: %.300s", body.c_str());
    } else {
      SY_FUZZ_CHECK(false, "a %u response of content type '%s'", code, type.c_str());
    }
  }

  static void check_error(const json& j, const std::string& raw) {
    SY_FUZZ_CHECK(j.contains("error") && j["error"].is_object(), "an error without an error object: %.200s", raw.c_str());
    const auto& e = j["error"];
    SY_FUZZ_CHECK(e.contains("type") && e["type"].is_string() && e.contains("message") && e["message"].is_string() &&
                      e.contains("param") && (e["param"].is_null() || e["param"].is_string()) && e.contains("code"),
                  "an error body of the wrong shape: %.200s", raw.c_str());
  }

  const request_plan& plan_;
  std::string pending_;
  std::optional<http::response_parser<http::string_body>> parser_;
  size_t done_ = 0;
  bool closed_ = false;
};

// ---- one connection ---------------------------------------------------------------------------

using clock_type = std::chrono::steady_clock;

void exchange(std::string_view in, const request_plan& plan, bool patient) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  SY_FUZZ_CHECK(fd >= 0, "socket: %s", std::strerror(errno));
  // Close with a reset: no TIME_WAIT left behind for each of the many connections.
  const linger lg{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(server_port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
    SY_FUZZ_CHECK(errno == EINPROGRESS, "connect: %s", std::strerror(errno));

  response_checker checker(plan);
  const auto deadline = clock_type::now() + std::chrono::seconds(5);
  size_t sent = 0;
  bool send_done = in.empty(), shut = false, eof = false, reset = false;
  char buf[16384];
  while (!eof) {
    const bool want_shut = send_done && !shut && (!patient || checker.responses() >= plan.answers);
    if (want_shut) {
      ::shutdown(fd, SHUT_WR);
      shut = true;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now()).count();
    SY_FUZZ_CHECK(left > 0, "the server neither answered nor closed within 5 s (%s client, %zu of %zu answers)",
                  patient ? "patient" : "leaving", checker.responses(), plan.answers);
    pollfd p{fd, static_cast<short>(POLLIN | (send_done ? 0 : POLLOUT)), 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) {
        checker.feed({buf, static_cast<size_t>(n)});
      } else if (n == 0) {
        eof = true;
      } else if (errno != EAGAIN && errno != EINTR) {
        // Reset: the server closed with bytes of ours unread (after a 431, 413 or a malformed
        // request); what it sent last may be lost with the reset.
        eof = reset = true;
      }
    }
    if (!send_done && (p.revents & POLLOUT)) {
      const ssize_t n = ::send(fd, in.data() + sent, in.size() - sent, MSG_NOSIGNAL);
      if (n > 0) sent += static_cast<size_t>(n);
      else if (errno != EAGAIN && errno != EINTR) send_done = true;  // the server closed its side
      if (sent == in.size()) send_done = true;
    }
  }
  if (!reset) checker.eof();
  ::close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  start_server();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const request_plan p = plan(in);
  exchange(in, p, false);
  exchange(in, p, true);
  // Every accepted completion is accounted for once its connection is gone (graceful drain waits
  // for this count to reach 0).
  for (int i = 0; server_ptr->active_requests() != 0; ++i) {
    SY_FUZZ_CHECK(i < 2000, "%d completion requests still active 2 s after their connections closed", server_ptr->active_requests());
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return 0;
}
