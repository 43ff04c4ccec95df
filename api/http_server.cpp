#include "api/http_server.hpp"

#include "api/dashboard.hpp"
#include "metrics/metrics.hpp"
#include "model/error.hpp"

#include <boost/asio.hpp>
#include <boost/beast.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <thread>
#include <vector>

namespace sy::api {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using json = nlohmann::json;

std::string error_body(const std::string& type, const std::string& message, const std::string& param) {
  return json{{"error", {{"type", type}, {"message", message}, {"param", param.empty() ? json(nullptr) : json(param)}, {"code", nullptr}}}}.dump();
}

namespace {

struct bad_request {
  std::string param, message;
};

struct parsed_completion {
  std::vector<std::vector<int32_t>> prompts;
  int max_tokens = 16;
  model::sampling_params sampling;
};

/// Validates a /v1/completions body; the first problem names its field.
std::variant<parsed_completion, bad_request> parse_completion(const json& j, const completion_service& svc) {
  parsed_completion out;
  if (!j.is_object()) return bad_request{"", "the body must be a JSON object"};
  if (j.contains("model") && !j["model"].is_null() && (!j["model"].is_string() || j["model"].get<std::string>() != svc.model_name))
    return bad_request{"model", "unknown model; this server serves '" + svc.model_name + "'"};
  if (!j.contains("prompt")) return bad_request{"prompt", "prompt is required"};
  const auto& p = j["prompt"];
  auto read_ids = [&](const json& a, std::vector<int32_t>& ids) -> std::optional<bad_request> {
    if (!a.is_array() || a.empty()) return bad_request{"prompt", "a prompt must be a non-empty list of token ids"};
    for (auto& v : a) {
      if (!v.is_number_integer()) return bad_request{"prompt", "token ids must be integers"};
      const int64_t id = v.get<int64_t>();
      if (id < 0 || id >= svc.vocab_size)
        return bad_request{"prompt", "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                         std::to_string(svc.vocab_size) + ")"};
      ids.push_back(static_cast<int32_t>(id));
    }
    return std::nullopt;
  };
  if (p.is_array() && !p.empty() && p[0].is_array()) {
    for (auto& one : p) {
      out.prompts.emplace_back();
      if (auto e = read_ids(one, out.prompts.back())) return *e;
    }
  } else {
    out.prompts.emplace_back();
    if (auto e = read_ids(p, out.prompts.back())) return *e;
  }
  if (j.contains("max_tokens") && !j["max_tokens"].is_null()) {
    if (!j["max_tokens"].is_number_integer()) return bad_request{"max_tokens", "max_tokens must be an integer"};
    const int64_t m = j["max_tokens"].get<int64_t>();
    if (m < 0 || m > 1 << 20) return bad_request{"max_tokens", "max_tokens must be in [0, 1048576]"};
    out.max_tokens = static_cast<int>(m);
  }
  auto number = [&](const char* key, double& dst, double lo, double hi) -> std::optional<bad_request> {
    if (!j.contains(key) || j[key].is_null()) return std::nullopt;
    if (!j[key].is_number()) return bad_request{key, std::string(key) + " must be a number"};
    const double v = j[key].get<double>();
    if (!std::isfinite(v) || v < lo || v > hi)
      return bad_request{key, std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"};
    dst = v;
    return std::nullopt;
  };
  if (auto e = number("temperature", out.sampling.temperature, 0.0, 100.0)) return *e;
  if (auto e = number("top_p", out.sampling.top_p, 1e-9, 1.0)) return *e;
  if (j.contains("top_k") && !j["top_k"].is_null()) {
    if (!j["top_k"].is_number_integer() || j["top_k"].get<int64_t>() < 0) return bad_request{"top_k", "top_k must be a non-negative integer"};
    out.sampling.top_k = static_cast<int>(j["top_k"].get<int64_t>());
  }
  if (j.contains("seed") && !j["seed"].is_null()) {
    if (!j["seed"].is_number_integer()) return bad_request{"seed", "seed must be an integer"};
    out.sampling.seed = static_cast<uint64_t>(j["seed"].get<int64_t>());
  }
  for (auto& pr : out.prompts)
    if (svc.max_context > 0 && static_cast<int64_t>(pr.size()) + out.max_tokens > svc.max_context)
      return bad_request{"max_tokens", "prompt (" + std::to_string(pr.size()) + " tokens) + max_tokens (" +
                                           std::to_string(out.max_tokens) + ") exceeds the context limit of " +
                                           std::to_string(svc.max_context)};
  return out;
}

class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket s, const completion_service& svc, const http_config& cfg, std::atomic<uint64_t>& ids,
          std::atomic<int>& admin_busy)
      : stream_(std::move(s)), svc_(svc), cfg_(cfg), ids_(ids), admin_busy_(admin_busy) {}

  void run() { read(); }

 private:
  void read() {
    parser_.emplace();
    parser_->body_limit(cfg_.max_body_bytes);
    stream_.expires_after(std::chrono::seconds(60));
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec == http::error::body_limit) {
        self->begin(self->parser_->get().target());
        return self->reply(http::status::payload_too_large,
                           error_body("invalid_request_error", "request body too large", ""), false);
      }
      if (ec) return;  // closed, timed out, or malformed: drop the connection
      self->handle(self->parser_->release());
    });
  }

  /// The routes (routes()) have a label of their own; anything else is counted as "other".
  static std::string_view route_of(std::string_view path) {
    for (const auto& r : routes())
      if (path == r.path) return r.path;
    return "other";
  }

  /// A request starts: its route label and the clock of its duration.
  void begin(std::string_view target) {
    route_ = route_of(target.substr(0, target.find('?')));
    started_ = std::chrono::steady_clock::now();
  }

  void reply(http::status st, std::string body, bool keep_alive, int retry_after = 0,
             std::string_view content_type = "application/json") {
    metrics::http_request(route_, static_cast<int>(st),
                          std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
    auto res = std::make_shared<http::response<http::string_body>>(st, 11);
    res->set(http::field::content_type, content_type);
    res->set(http::field::server, "switchyard");
    if (retry_after > 0) res->set(http::field::retry_after, std::to_string(retry_after));
    res->keep_alive(keep_alive);
    res->body() = std::move(body);
    res->prepare_payload();
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec || !res->keep_alive()) {
        beast::error_code ignored;
        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
        return;
      }
      self->read();
    });
  }

  void handle(http::request<http::string_body> req) {
    const bool ka = req.keep_alive();
    begin(req.target());
    const std::string target(req.target().substr(0, req.target().find('?')));
    const bool get = req.method() == http::verb::get;
    if (target == "/metrics") {
      if (!get) return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use GET", ""), ka);
      return reply(http::status::ok, metrics::serialize(), ka, 0, metrics::content_type);
    }
    if (target == "/dashboard") {
      if (!get) return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use GET", ""), ka);
      return reply(http::status::ok, std::string(dashboard_page()), ka, 0, "text/html; charset=utf-8");
    }
    if (target == "/dashboard/data") {
      if (!get) return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use GET", ""), ka);
      return reply(http::status::ok, dashboard_data(svc_.model_name, svc_.cluster ? svc_.cluster() : cluster_view{}), ka);
    }
    if (target == "/healthz") {
      if (req.method() != http::verb::get) return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use GET", ""), ka);
      return reply(http::status::ok, R"({"status":"ok"})", ka);
    }
    if (target == "/readyz") {
      if (req.method() != http::verb::get) return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use GET", ""), ka);
      if (svc_.ready()) return reply(http::status::ok, R"({"status":"ready"})", ka);
      return reply(http::status::service_unavailable, R"({"status":"not ready"})", ka, 1);
    }
    if (target == "/v1/completions") {
      if (req.method() != http::verb::post)
        return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use POST", ""), ka);
      return completions(req.body(), ka);
    }
    if (target.starts_with("/admin/")) {
      if (cfg_.admin_token.empty())
        return reply(http::status::unauthorized,
                     error_body("authentication_error",
                                "admin routes are closed: start the server with an admin token (SWITCHYARD_ADMIN_TOKEN)", ""),
                     ka);
      const std::string auth(req[http::field::authorization]);
      const std::string prefix = "Bearer ";
      if (!auth.starts_with(prefix) || !constant_time_equal(auth.substr(prefix.size()), cfg_.admin_token))
        return reply(http::status::unauthorized,
                     error_body("authentication_error", "missing or wrong bearer token (Authorization: Bearer ...)", ""), ka);
      if (target == "/admin/rebalance") {
        if (req.method() != http::verb::post)
          return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use POST", ""), ka);
        if (!svc_.rebalance)
          return reply(http::status::not_implemented, error_body("server_error", "this server cannot rebalance", ""), ka);
        // A round takes as long as loading the new replicas: off the I/O threads.
        ++admin_busy_;
        std::thread([self = shared_from_this(), ka] {
          auto r = self->svc_.rebalance();
          --self->admin_busy_;
          net::post(self->stream_.get_executor(), [self, ka, r = std::move(r)] {
            if (r) self->reply(http::status::ok, *r, ka);
            else self->reply(http::status::service_unavailable, error_body("server_error", model::describe(r.error()), ""), ka);
          });
        }).detach();
        return;
      }
    }
    return reply(http::status::not_found, error_body("invalid_request_error", "no route " + target, ""), ka);
  }

  void completions(const std::string& body, bool ka) {
    json j = json::parse(body, nullptr, false);
    if (j.is_discarded()) return reply(http::status::bad_request, error_body("invalid_request_error", "the body is not valid JSON", ""), ka);
    auto parsed = parse_completion(j, svc_);
    if (auto* bad = std::get_if<bad_request>(&parsed))
      return reply(http::status::bad_request, error_body("invalid_request_error", bad->message, bad->param), ka);
    auto& req = std::get<parsed_completion>(parsed);
    if (!svc_.ready())
      return reply(http::status::service_unavailable, error_body("server_error", "the cluster is not ready yet", ""), ka, 1);
    // One generation per prompt; the response goes out when the last one finishes.
    struct gather {
      std::mutex mu;
      std::vector<scheduler::completion> done;
      size_t left = 0;
    };
    auto g = std::make_shared<gather>();
    g->done.resize(req.prompts.size());
    g->left = req.prompts.size();
    const uint64_t id = ++ids_;
    auto self = shared_from_this();
    auto finish = [self, g, id, ka] {
      json choices = json::array();
      int64_t prompt_tokens = 0, completion_tokens = 0;
      double ttft = 0, total = 0;
      for (size_t i = 0; i < g->done.size(); ++i) {
        auto& c = g->done[i];
        if (c.error) {
          const auto st = c.error.category() == caf::atom("scheduler") ? http::status::service_unavailable
                                                                       : http::status::internal_server_error;
          return self->reply(st, error_body("server_error", model::describe(c.error), ""), ka, 1);
        }
        prompt_tokens += c.prompt_tokens;
        completion_tokens += static_cast<int64_t>(c.tokens.size());
        ttft = std::max(ttft, c.first_token_ms);
        total = std::max(total, c.total_ms);
        choices.push_back({{"index", i}, {"text", ""}, {"token_ids", c.tokens}, {"logprobs", nullptr}, {"finish_reason", c.finish_reason}});
      }
      json res = {{"id", "cmpl-" + std::to_string(id)},
                  {"object", "text_completion"},
                  {"created", std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()},
                  {"model", self->svc_.model_name},
                  {"choices", choices},
                  {"usage", {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens}, {"total_tokens", prompt_tokens + completion_tokens}}},
                  // Server-side timings (an extension to the OpenAI shape): time to first token and
                  // to the last, measured from admission to the queue, the slowest prompt's.
                  {"timing", {{"first_token_ms", ttft}, {"total_ms", total}}}};
      self->reply(http::status::ok, res.dump(), ka);
    };
    for (size_t i = 0; i < req.prompts.size(); ++i) {
      scheduler::generation_request r;
      r.id = id * 1000 + i;
      r.prompt = std::move(req.prompts[i]);
      r.max_tokens = req.max_tokens;
      r.sampling = req.sampling;
      r.sampling.seed += i;
      r.on_done = [self, g, i, finish](scheduler::completion c) {
        bool last;
        {
          std::lock_guard lock(g->mu);
          g->done[i] = std::move(c);
          last = --g->left == 0;
        }
        if (last) net::post(self->stream_.get_executor(), finish);
      };
      if (auto err = svc_.submit(std::move(r))) {
        // Refused at admission: nothing of this request runs... except prompts already queued,
        // which complete into a response nobody reads. Answer now with the reason.
        const bool full = err.code() == static_cast<uint8_t>(scheduler::scheduler_errc::queue_full) ||
                          err.code() == static_cast<uint8_t>(scheduler::scheduler_errc::shutting_down);
        return reply(full ? http::status::service_unavailable : http::status::bad_request,
                     error_body(full ? "server_error" : "invalid_request_error", model::describe(err), ""), ka, full ? 1 : 0);
      }
    }
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  const completion_service& svc_;
  const http_config& cfg_;
  std::atomic<uint64_t>& ids_;
  std::atomic<int>& admin_busy_;  ///< admin calls running off the I/O threads (stop waits for them)
  std::string_view route_ = "other";
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace

const std::vector<route_info>& routes() {
  static const std::vector<route_info> all{
      {"GET", "/healthz", false},
      {"GET", "/readyz", false},
      {"POST", "/v1/completions", false},
      {"GET", "/metrics", false},
      {"GET", "/dashboard", false},
      {"GET", "/dashboard/data", false},
      {"POST", "/admin/rebalance", true},
  };
  return all;
}

bool constant_time_equal(const std::string& a, const std::string& b) {
  // Compares every byte of the longer string; the length difference is folded in too.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

struct http_server::impl {
  http_config cfg;
  completion_service svc;
  net::io_context io;
  tcp::acceptor acceptor{io};
  std::vector<std::thread> threads;
  std::atomic<uint64_t> ids{0};
  std::atomic<int> admin_busy{0};
  uint16_t port = 0;

  void accept() {
    acceptor.async_accept(net::make_strand(io), [this](beast::error_code ec, tcp::socket s) {
      if (ec) return;  // acceptor closed
      std::make_shared<session>(std::move(s), svc, cfg, ids, admin_busy)->run();
      accept();
    });
  }
};

http_server::http_server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
http_server::~http_server() { stop(); }

caf::expected<std::unique_ptr<http_server>> http_server::start(const http_config& cfg, completion_service svc) {
  auto p = std::make_unique<impl>();
  p->cfg = cfg;
  p->svc = std::move(svc);
  beast::error_code ec;
  auto addr = net::ip::make_address(cfg.host, ec);
  if (ec) return model::make_error(model::model_errc::invalid_argument, "--http: '" + cfg.host + "' is not an IP address");
  tcp::endpoint ep{addr, cfg.port};
  p->acceptor.open(ep.protocol(), ec);
  if (!ec) p->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) p->acceptor.bind(ep, ec);
  if (!ec) p->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return model::make_error(model::model_errc::io_error, "--http: cannot listen on " + cfg.host + ":" + std::to_string(cfg.port) +
                                                              ": " + ec.message());
  p->port = p->acceptor.local_endpoint().port();
  p->accept();
  for (int i = 0; i < std::max(1, cfg.threads); ++i) p->threads.emplace_back([raw = p.get()] { raw->io.run(); });
  return std::unique_ptr<http_server>(new http_server(std::move(p)));
}

uint16_t http_server::port() const { return impl_->port; }

void http_server::stop() {
  if (!impl_ || impl_->threads.empty()) return;
  // An admin call still running would post its answer to a destroyed context: let it end first.
  for (int i = 0; i < 6000 && impl_->admin_busy > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  net::post(impl_->io, [p = impl_.get()] {
    beast::error_code ec;
    p->acceptor.close(ec);
  });
  impl_->io.stop();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
}

}  // namespace sy::api
