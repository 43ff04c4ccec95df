#include "api/http_server.hpp"

#include "api/dashboard.hpp"
#include "api/request.hpp"
#include "metrics/metrics.hpp"
#include "model/error.hpp"
#include "model/tokenizer.hpp"

#include <boost/asio.hpp>
#include <boost/beast.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <deque>
#include <functional>
#include <optional>
#include <mutex>
#include <thread>
#include <vector>

namespace sy::api {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using json = nlohmann::json;

namespace {
/// Text that reaches JSON may come from a client or a model: invalid UTF-8 is replaced, never thrown.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
}  // namespace

std::string error_body(const std::string& type, const std::string& message, const std::string& param) {
  return dump(json{{"error", {{"type", type}, {"message", message}, {"param", param.empty() ? json(nullptr) : json(param)}, {"code", nullptr}}}});
}

namespace {

/// What every session shares with the server.
struct server_state {
  http_config cfg;
  completion_service svc;
  request_limits limits;
  std::atomic<uint64_t> ids{0};
  std::atomic<int> admin_busy{0};
  std::atomic<int> connections{0};
  std::atomic<int> active{0};
  std::atomic<bool> draining{false};
};

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string bad_request_body(const bad_request& b) {
  json j = json::parse(error_body("invalid_request_error", b.message, b.param));
  if (b.n_prompt_tokens >= 0) j["error"]["n_prompt_tokens"] = b.n_prompt_tokens;
  return dump(j);
}

/// Longest suffix of `text` that is a proper prefix of one of `stops` (held back while streaming,
/// since the next token may complete a stop string).
size_t held_back(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& st : stops)
    for (size_t k = std::min(st.size() - 1, text.size()); k > hold; --k)
      if (text.compare(text.size() - k, k, st, 0, k) == 0) {
        hold = k;
        break;
      }
  // Never split a UTF-8 character.
  while (hold < text.size() && hold > 0 && (static_cast<unsigned char>(text[text.size() - hold]) & 0xC0) == 0x80) ++hold;
  return hold;
}

class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket s, server_state& st)
      : stream_(std::move(s)), timer_(stream_.get_executor()), st_(st), cfg_(st.cfg), svc_(st.svc) {
    ++st_.connections;
  }
  ~session() { --st_.connections; }

  void run() { read(true); }

 private:
  // ---- reading requests -----------------------------------------------------------------------

  void read(bool first) {
    head_ = false;
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(std::min<size_t>(cfg_.max_header_bytes, UINT32_MAX)));
    parser_->body_limit(cfg_.max_body_bytes);
    // The first request's head must come within the header timeout; on a kept-alive connection the
    // next one may wait up to the idle timeout. (A timer of our own rather than the stream's: when
    // the stream's expires, it closes the socket, and a 408 could not be sent.)
    stream_.expires_never();
    arm(first || buffer_.size() > 0 ? cfg_.header_timeout : cfg_.idle_timeout);
    http::async_read_header(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->on_header(ec);
    });
  }

  void arm(std::chrono::milliseconds t) {
    timed_out_ = false;
    timer_.expires_after(t);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;  // cancelled: the read finished in time
      self->timed_out_ = true;
      beast::error_code ignored;
      self->stream_.socket().cancel(ignored);
    });
  }

  void on_header(beast::error_code ec) {
    timer_.cancel();
    if (ec == http::error::header_limit)
      return reply(http::status::request_header_fields_too_large,
                   error_body("invalid_request_error", "request headers larger than " + std::to_string(cfg_.max_header_bytes) + " bytes", ""),
                   false);
    if (timed_out_) {
      if (parser_->got_some() || buffer_.size() > 0)
        return reply(http::status::request_timeout, error_body("invalid_request_error", "the request head did not arrive in time", ""), false);
      return close();  // an idle keep-alive connection
    }
    if (!ec || ec == http::error::body_limit) begin(parser_->get().target());
    if (ec == http::error::body_limit)
      return reply(http::status::payload_too_large, error_body("invalid_request_error", "request body too large", ""), false);
    if (ec) return close();  // closed or malformed
    if (parser_->is_done()) return handle(parser_->release());
    arm(cfg_.body_timeout);
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec2, size_t) {
      self->timer_.cancel();
      if (ec2 == http::error::body_limit)
        return self->reply(http::status::payload_too_large,
                           error_body("invalid_request_error", "request body larger than " + std::to_string(self->cfg_.max_body_bytes) + " bytes", ""),
                           false);
      if (self->timed_out_)
        return self->reply(http::status::request_timeout, error_body("invalid_request_error", "the request body did not arrive in time", ""), false);
      if (ec2) return self->close();
      self->handle(self->parser_->release());
    });
  }

  void close() {
    closed_ = true;
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
  }

  // ---- metrics ----------------------------------------------------------------------------------

  /// The routes of routes() have a label of their own; anything else is counted as "other".
  static std::string_view route_of(std::string_view path) {
    for (const auto& r : routes())
      if (path == r.path) return r.path;
    return "other";
  }

  /// A request's head is in: its route label, and the clock of its duration (restarted once the
  /// body is in too).
  void begin(std::string_view target) {
    route_ = route_of(target.substr(0, target.find('?')));
    started_ = std::chrono::steady_clock::now();
  }

  /// One response for the request: `switchyard_http_requests_total` and its duration. 499 (as
  /// nginx counts it) when the client went away before its answer.
  void count(int status) {
    metrics::http_request(route_, status, std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
    route_ = "other";
  }

  // ---- plain responses ------------------------------------------------------------------------

  void reply(http::status code, std::string body, bool keep_alive, int retry_after = 0, const char* type = "application/json") {
    if (closed_) return count(499);
    count(static_cast<int>(code));
    auto res = std::make_shared<http::response<http::string_body>>(code, 11);
    res->set(http::field::content_type, type);
    res->set(http::field::server, "switchyard");
    if (retry_after > 0) res->set(http::field::retry_after, std::to_string(retry_after));
    res->keep_alive(keep_alive && !st_.draining);
    res->body() = std::move(body);
    res->prepare_payload();
    stream_.expires_after(cfg_.body_timeout);  // a client that does not read its answer is cut off too
    auto done = [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec || !res->keep_alive()) return self->close();
      self->read(false);
    };
    if (head_) {
      // The answer to HEAD has the header fields a GET would get, Content-Length included, and no
      // content (RFC 9110 §9.3.2): a kept-alive client would read a body as the next response.
      auto sr = std::make_shared<http::response_serializer<http::string_body>>(*res);
      http::async_write_header(stream_, *sr, [sr, done = std::move(done)](beast::error_code ec, size_t n) { done(ec, n); });
      return;
    }
    http::async_write(stream_, *res, std::move(done));
  }

  void handle(http::request<http::string_body> req) {
    const bool ka = req.keep_alive();
    head_ = req.method() == http::verb::head;
    std::string target(req.target());
    if (auto q = target.find('?'); q != std::string::npos) target.resize(q);
    begin(target);
    const auto method = req.method();
    auto allow = [&](http::verb v, const char* name) {
      if (method == v) return true;
      reply(http::status::method_not_allowed, error_body("invalid_request_error", std::string("use ") + name, ""), ka);
      return false;
    };
    // Observability: public like the health routes (no token), GET only.
    if (target == "/metrics") {
      if (allow(http::verb::get, "GET")) reply(http::status::ok, metrics::serialize(), ka, 0, metrics::content_type.data());
      return;
    }
    if (target == "/dashboard") {
      if (allow(http::verb::get, "GET")) reply(http::status::ok, std::string(dashboard_page()), ka, 0, "text/html; charset=utf-8");
      return;
    }
    if (target == "/dashboard/data") {
      if (allow(http::verb::get, "GET"))
        reply(http::status::ok, dashboard_data(svc_.model_name, svc_.cluster ? svc_.cluster() : cluster_view{}), ka);
      return;
    }
    if (target == "/healthz") {
      if (allow(http::verb::get, "GET")) reply(http::status::ok, R"({"status":"ok"})", ka);
      return;
    }
    if (target == "/readyz") {
      if (!allow(http::verb::get, "GET")) return;
      if (st_.draining) return reply(http::status::service_unavailable, R"({"status":"draining"})", ka, 1);
      if (svc_.ready()) return reply(http::status::ok, R"({"status":"ready"})", ka);
      return reply(http::status::service_unavailable, R"({"status":"not ready"})", ka, 1);
    }
    const bool inference = target == "/v1/completions" || target == "/v1/chat/completions" || target == "/tokenize" ||
                           target == "/detokenize" || target == "/v1/models";
    if (inference && !cfg_.api_token.empty()) {
      const std::string auth(req[http::field::authorization]);
      if (!auth.starts_with("Bearer ") || !constant_time_equal(auth.substr(7), cfg_.api_token))
        return reply(http::status::unauthorized,
                     error_body("authentication_error", "missing or wrong bearer token (Authorization: Bearer ...)", ""), ka);
    }
    if (target == "/v1/models") {
      if (!allow(http::verb::get, "GET")) return;
      json m = {{"id", svc_.model_name}, {"object", "model"}, {"created", now_seconds()}, {"owned_by", "switchyard"},
                {"max_model_len", svc_.max_context}};
      return reply(http::status::ok, dump(json{{"object", "list"}, {"data", json::array({m})}}), ka);
    }
    if (target.starts_with("/admin/")) return admin(target, req, ka);
    if (!inference) return reply(http::status::not_found, error_body("invalid_request_error", "no route " + target, ""), ka);
    if (!allow(http::verb::post, "POST")) return;
    if (st_.draining)
      return reply(http::status::service_unavailable, error_body("server_error", "the server is shutting down", ""), false, 1);
    if (target == "/tokenize") return tokenize(req.body(), ka);
    if (target == "/detokenize") return detokenize(req.body(), ka);
    if (target == "/v1/chat/completions")
      return reply(http::status::not_implemented,
                   error_body("server_error",
                              "chat templates are not rendered by this server yet: render the conversation with the "
                              "model's template and send it to /v1/completions",
                              ""),
                   ka);
    return completions(req.body(), ka);
  }

  void admin(const std::string& target, const http::request<http::string_body>& req, bool ka) {
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
    if (target == "/admin/cluster") {
      if (req.method() != http::verb::get)
        return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use GET", ""), ka);
      if (!svc_.cluster_state)
        return reply(http::status::not_implemented, error_body("server_error", "this server has no cluster state", ""), ka);
      return reply(http::status::ok, svc_.cluster_state(), ka);
    }
    if (target != "/admin/rebalance")
      return reply(http::status::not_found, error_body("invalid_request_error", "no route " + target, ""), ka);
    if (req.method() != http::verb::post)
      return reply(http::status::method_not_allowed, error_body("invalid_request_error", "use POST", ""), ka);
    if (!svc_.rebalance)
      return reply(http::status::not_implemented, error_body("server_error", "this server cannot rebalance", ""), ka);
    // A round takes as long as loading the new replicas: off the I/O threads.
    ++st_.admin_busy;
    stream_.expires_never();
    std::thread([self = shared_from_this(), ka] {
      auto r = self->svc_.rebalance();
      net::post(self->stream_.get_executor(), [self, ka, r = std::move(r)] {
        if (r) self->reply(http::status::ok, *r, ka);
        else self->reply(http::status::service_unavailable, error_body("server_error", model::describe(r.error()), ""), ka);
      });
      --self->st_.admin_busy;
    }).detach();
  }

  void tokenize(const std::string& body, bool ka) {
    auto parsed = parse_tokenize(body, st_.limits);
    if (auto* bad = std::get_if<bad_request>(&parsed)) return reply(http::status::bad_request, bad_request_body(*bad), ka);
    auto& r = std::get<tokenize_request>(parsed);
    auto ids = svc_.tokenizer->encode(r.text, r.add_special_tokens);
    if (!ids) return reply(http::status::bad_request, error_body("invalid_request_error", model::describe(ids.error()), "prompt"), ka);
    reply(http::status::ok, dump(json{{"tokens", *ids}, {"count", ids->size()}, {"max_model_len", svc_.max_context}}), ka);
  }

  void detokenize(const std::string& body, bool ka) {
    auto parsed = parse_detokenize(body, st_.limits);
    if (auto* bad = std::get_if<bad_request>(&parsed)) return reply(http::status::bad_request, bad_request_body(*bad), ka);
    auto& r = std::get<detokenize_request>(parsed);
    reply(http::status::ok, dump(json{{"prompt", svc_.tokenizer->decode(r.tokens, false)}}), ka);
  }

  // ---- completions ----------------------------------------------------------------------------

  /// One choice (prompt × n) of a request, filled from the engine thread.
  struct choice {
    size_t prompt = 0;
    std::unique_ptr<model::incremental_decoder> decoder;
    std::string text;        ///< generated text so far (cut at a stop string)
    size_t emitted = 0;      ///< bytes of `text` already streamed
    bool stopped = false;    ///< a stop string ended it
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;
    std::vector<std::vector<std::pair<int32_t, float>>> top;
    std::optional<scheduler::completion> done;
  };
  struct request_state {
    std::mutex mu;
    completion_request req;
    std::vector<choice> choices;
    std::vector<std::string> prompt_text;  ///< for echo
    size_t left = 0;
    uint64_t id = 0;
    int64_t created = 0;
    bool streaming = false;  ///< set before any choice is submitted, then constant
    bool refused = false;    ///< answered (or its stream ended) at admission; on the session strand
    std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);
  };

  std::string token_text(int32_t id) const {
    if (!svc_.tokenizer) return std::to_string(id);
    const int32_t one[1] = {id};
    return svc_.tokenizer->decode(one, false);
  }

  json logprobs_json(const choice& c, size_t from, size_t to) const {
    json tokens = json::array(), lps = json::array(), tops = json::array();
    for (size_t i = from; i < to && i < c.logprobs.size(); ++i) {
      tokens.push_back(token_text(c.tokens[i]));
      lps.push_back(c.logprobs[i]);
      json t = json::object();
      for (const auto& [id, lp] : c.top[i]) t[token_text(id)] = lp;
      tops.push_back(std::move(t));
    }
    return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}};
  }

  void completions(const std::string& body, bool ka) {
    auto parsed = parse_completion(body, st_.limits);
    if (auto* bad = std::get_if<bad_request>(&parsed)) return reply(http::status::bad_request, bad_request_body(*bad), ka);
    if (!svc_.ready())
      return reply(http::status::service_unavailable, error_body("server_error", "the cluster is not ready yet", ""), ka, 1);
    auto rs = std::make_shared<request_state>();
    rs->req = std::move(std::get<completion_request>(parsed));
    rs->id = ++st_.ids;
    rs->created = now_seconds();
    const auto& req = rs->req;
    const size_t n = static_cast<size_t>(req.n);
    rs->choices.resize(req.prompts.size() * n);
    for (size_t i = 0; i < rs->choices.size(); ++i) {
      rs->choices[i].prompt = i / n;
      if (svc_.tokenizer)
        rs->choices[i].decoder = std::make_unique<model::incremental_decoder>(*svc_.tokenizer, req.skip_special_tokens);
    }
    if (req.echo)
      for (const auto& p : req.prompts) rs->prompt_text.push_back(svc_.tokenizer ? svc_.tokenizer->decode(p, req.skip_special_tokens) : "");
    rs->left = rs->choices.size();
    rs->streaming = req.stream;
    keep_alive_ = ka;
    ++st_.active;
    stream_.expires_never();  // generation takes as long as it takes; a client that leaves cancels it
    rs_cancel_ = rs->cancel;
    if (rs->streaming) {
      start_stream(*rs);
      if (req.echo)
        for (size_t i = 0; i < rs->choices.size(); ++i)
          send_event(*rs, {{"index", i}, {"text", rs->prompt_text[rs->choices[i].prompt]}, {"token_ids", json::array()},
                           {"logprobs", nullptr}, {"finish_reason", nullptr}});
    }

    auto self = shared_from_this();
    for (size_t i = 0; i < rs->choices.size(); ++i) {
      scheduler::generation_request r;
      r.id = rs->id * 1000 + i;
      r.prompt = req.prompts[rs->choices[i].prompt];
      r.max_tokens = req.max_tokens;
      r.sampling = req.sampling;
      r.sampling.seed += i;
      r.stop_token_ids = req.stop_token_ids;
      r.stop_at_eos = !req.ignore_eos;
      r.logprobs = req.logprobs;
      r.cancel = rs->cancel;
      r.on_token = [self, rs, i](const scheduler::token_event& ev) { return self->on_token(*rs, i, ev); };
      r.on_done = [self, rs, i](scheduler::completion c) { self->on_done(rs, i, std::move(c)); };
      if (auto err = svc_.submit(std::move(r))) {
        // Refused at admission. Choices already queued are cancelled (their slots freed at the next
        // step); the answer says why.
        rs->cancel->store(true);
        const bool full = err.code() == static_cast<uint8_t>(scheduler::scheduler_errc::queue_full) ||
                          err.code() == static_cast<uint8_t>(scheduler::scheduler_errc::shutting_down);
        bool none_left;
        {
          std::lock_guard lock(rs->mu);
          rs->left -= rs->choices.size() - i;  // those never submitted
          rs->refused = true;
          none_left = rs->left == 0;
        }
        // The last of the choices already queued to end (cancelled) counts the request as answered;
        // when there is none (i == 0, or the engine was quick and they all ended already), here.
        if (none_left) --st_.active;
        if (rs->streaming) {
          stream_error(*rs, error_body("server_error", model::describe(err), ""));
          return;
        }
        return reply(full ? http::status::service_unavailable : http::status::bad_request,
                     error_body(full ? "server_error" : "invalid_request_error", model::describe(err), ""), ka, full ? 1 : 0);
      }
    }
    if (!rs->streaming) {
      bool pending;
      {
        std::lock_guard lock(rs->mu);
        pending = rs->left > 0;
      }
      if (pending) watch_disconnect(rs);  // nothing to watch for when it is already answered
    }
  }

  /// Engine thread: one more token of choice i. Returns false when a stop string ended it.
  bool on_token(request_state& rs, size_t i, const scheduler::token_event& ev) {
    std::string piece;
    json lp;
    bool keep_going = true;
    {
      std::lock_guard lock(rs.mu);
      auto& c = rs.choices[i];
      if (c.stopped) return false;
      c.tokens.push_back(ev.token);
      if (ev.top) {
        c.logprobs.push_back(ev.logprob);
        c.top.push_back(*ev.top);
      }
      if (c.decoder) {
        const size_t before = c.text.size();
        c.text += c.decoder->push(ev.token);
        if (!rs.req.stop.empty() && c.text.size() > before) {
          size_t longest = 0;
          for (const auto& s : rs.req.stop) longest = std::max(longest, s.size());
          const size_t from = before >= longest ? before - longest + 1 : 0;
          size_t cut = std::string::npos;
          for (const auto& s : rs.req.stop) cut = std::min(cut, c.text.find(s, from));
          if (cut != std::string::npos) {
            c.text.resize(cut);
            c.stopped = true;
            keep_going = false;
          }
        }
      }
      if (!rs.streaming) return keep_going;
      const size_t safe = c.stopped ? c.text.size() : c.text.size() - held_back(c.text, rs.req.stop);
      if (safe > c.emitted) {
        piece = c.text.substr(c.emitted, safe - c.emitted);
        c.emitted = safe;
      }
      if (ev.top) lp = logprobs_json(c, c.logprobs.size() - 1, c.logprobs.size());
    }
    json choice_j = {{"index", i}, {"text", piece}, {"token_ids", {ev.token}}, {"logprobs", ev.top ? lp : json(nullptr)},
                     {"finish_reason", nullptr}};
    send_event(rs, std::move(choice_j));
    return keep_going;
  }

  json chunk(const request_state& rs, json choices) const {
    return {{"id", "cmpl-" + std::to_string(rs.id)}, {"object", "text_completion"}, {"created", rs.created},
            {"model", svc_.model_name}, {"choices", std::move(choices)}};
  }

  void send_event(const request_state& rs, json choice_j) {
    send_raw(rs, std::make_shared<std::string>("data: " + dump(chunk(rs, json::array({std::move(choice_j)}))) + "\n\n"));
  }

  /// Engine thread: choice i finished (or failed).
  void on_done(const std::shared_ptr<request_state>& rs, size_t i, scheduler::completion c) {
    bool last;
    std::string tail;
    {
      std::lock_guard lock(rs->mu);
      auto& ch = rs->choices[i];
      if (ch.decoder && !ch.stopped) ch.text += ch.decoder->finish();
      if (ch.stopped && c.finish_reason != "error") c.finish_reason = "stop";
      if (rs->streaming && ch.emitted < ch.text.size()) {
        tail = ch.text.substr(ch.emitted);
        ch.emitted = ch.text.size();
      }
      ch.done = std::move(c);
      last = --rs->left == 0;
    }
    if (rs->streaming) {
      const auto& done = *rs->choices[i].done;
      if (done.error && done.finish_reason == "error") {
        send_raw(*rs, std::make_shared<std::string>(
            "data: " + error_body("server_error", model::describe(done.error), "") + "\n\n"));
      } else if (done.finish_reason != "cancelled") {
        send_event(*rs, {{"index", i}, {"text", tail}, {"token_ids", json::array()}, {"logprobs", nullptr},
                         {"finish_reason", done.finish_reason}});
      }
      if (last) finish_stream(rs);
      return;
    }
    if (last) net::post(stream_.get_executor(), [self = shared_from_this(), rs] { self->finish_plain(rs); });
  }

  json usage(const request_state& rs) const {
    int64_t prompt_tokens = 0, completion_tokens = 0;
    for (const auto& p : rs.req.prompts) prompt_tokens += static_cast<int64_t>(p.size());
    for (const auto& c : rs.choices)
      if (c.done) completion_tokens += static_cast<int64_t>(c.done->tokens.size());
    return {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens}, {"total_tokens", prompt_tokens + completion_tokens}};
  }

  void finish_plain(const std::shared_ptr<request_state>& rs) {
    --st_.active;
    if (rs->refused) return;  // answered when it was refused
    if (rs->cancel->load() && closed_) return;  // the client left; nothing to answer
    json choices = json::array();
    double ttft = 0, total = 0;
    for (size_t i = 0; i < rs->choices.size(); ++i) {
      auto& c = rs->choices[i];
      const auto& d = *c.done;
      if (d.error) {
        const auto code = d.error.category() == caf::atom("scheduler") ? http::status::service_unavailable
                                                                       : http::status::internal_server_error;
        return respond_after_watch(code, error_body("server_error", model::describe(d.error), ""), 1);
      }
      ttft = std::max(ttft, d.first_token_ms);
      total = std::max(total, d.total_ms);
      std::string text = rs->req.echo ? rs->prompt_text[c.prompt] + c.text : c.text;
      json lp = rs->req.logprobs >= 0 ? logprobs_json(c, 0, c.logprobs.size()) : json(nullptr);
      choices.push_back({{"index", i}, {"text", text}, {"token_ids", d.tokens}, {"logprobs", lp}, {"finish_reason", d.finish_reason}});
    }
    json res = chunk(*rs, choices);
    res["usage"] = usage(*rs);
    // Server-side timings (an extension): time to first token and to the last, from admission to
    // the queue, the slowest choice's.
    res["timing"] = {{"first_token_ms", ttft}, {"total_ms", total}};
    respond_after_watch(http::status::ok, dump(res), 0);
  }

  // ---- client disconnect while a plain (non-streamed) answer is computed ----------------------

  void watch_disconnect(std::shared_ptr<request_state> rs) {
    watching_ = true;
    stream_.async_read_some(buffer_.prepare(4096), [self = shared_from_this(), rs](beast::error_code ec, size_t n) {
      self->watching_ = false;
      if (ec && ec != net::error::operation_aborted) {
        rs->cancel->store(true);  // the client went away: free its sequences
        self->count(499);
        self->closed_ = true;
        self->pending_.reset();
        return;
      }
      if (!ec) self->buffer_.commit(n);  // the start of a pipelined request: kept for later
      if (self->pending_) {
        auto f = std::move(*self->pending_);
        self->pending_.reset();
        f();
      }
    });
  }

  void respond_after_watch(http::status code, std::string body, int retry_after) {
    auto f = [self = shared_from_this(), code, body = std::move(body), retry_after] {
      self->reply(code, body, self->keep_alive_, retry_after);
    };
    if (watching_) {
      pending_ = std::move(f);
      beast::error_code ignored;
      stream_.socket().cancel(ignored);
    } else {
      f();
    }
  }

  // ---- server-sent events ---------------------------------------------------------------------

  void start_stream(const request_state& rs) {
    stream_id_ = rs.id;
    sse_res_ = std::make_shared<http::response<http::empty_body>>(http::status::ok, 11);
    sse_res_->set(http::field::content_type, "text/event-stream");
    sse_res_->set(http::field::cache_control, "no-cache");
    sse_res_->set(http::field::server, "switchyard");
    sse_res_->keep_alive(keep_alive_);
    sse_res_->chunked(true);
    sse_sr_ = std::make_shared<http::response_serializer<http::empty_body>>(*sse_res_);
    writing_ = true;
    http::async_write_header(stream_, *sse_sr_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->writing_ = false;
      if (ec) return self->client_gone();
      self->pump();
    });
  }

  /// Any thread: an event of request `rs`'s stream, written in order on the session's strand.
  void send_raw(const request_state& rs, std::shared_ptr<std::string> data) {
    net::post(stream_.get_executor(), [self = shared_from_this(), id = rs.id, data] { self->queue_write(id, data); });
  }

  /// Strand: the stream's last events; whatever of request `id` comes after them is dropped.
  void end_stream(uint64_t id, std::vector<std::shared_ptr<std::string>> last) {
    for (auto& d : last) queue_write(id, std::move(d));
    if (stream_id_ != id) return;
    stream_id_ = 0;
    end_requested_ = true;
    pump();
  }

  void stream_error(const request_state& rs, std::string body) {
    // Refused after the stream's head went out: one error event, then the end. Events of the
    // choices already queued, still on their way, are dropped.
    end_stream(rs.id, {std::make_shared<std::string>("data: " + body + "\n\n"), std::make_shared<std::string>("data: [DONE]\n\n")});
  }

  void finish_stream(const std::shared_ptr<request_state>& rs) {
    std::shared_ptr<std::string> usage_event;
    if (rs->req.include_usage) {
      json u = chunk(*rs, json::array());
      u["usage"] = usage(*rs);
      usage_event = std::make_shared<std::string>("data: " + dump(u) + "\n\n");
    }
    net::post(stream_.get_executor(), [self = shared_from_this(), rs, usage_event] {
      --self->st_.active;
      if (rs->refused) return;  // the stream already ended with the refusal
      std::vector<std::shared_ptr<std::string>> last;
      if (usage_event) last.push_back(usage_event);
      last.push_back(std::make_shared<std::string>("data: [DONE]\n\n"));
      self->end_stream(rs->id, std::move(last));
    });
  }

  /// Strand: queues an event of request `id`'s stream; dropped unless that stream is the open one
  /// (a request refused mid-way, or one before it on this connection, may still have events on
  /// their way from the engine thread).
  void queue_write(uint64_t id, std::shared_ptr<std::string> data) {
    if (closed_ || id != stream_id_) return;
    out_.push_back(std::move(data));
    pump();
  }

  void pump() {
    if (writing_ || closed_ || !sse_sr_) return;
    if (!out_.empty()) {
      auto data = out_.front();
      out_.pop_front();
      writing_ = true;
      net::async_write(stream_, http::make_chunk(net::buffer(*data)), [self = shared_from_this(), data](beast::error_code ec, size_t) {
        self->writing_ = false;
        if (ec) return self->client_gone();
        self->pump();
      });
      return;
    }
    if (end_requested_ && !end_written_) {
      end_written_ = true;
      count(200);
      writing_ = true;
      net::async_write(stream_, http::make_chunk_last(), [self = shared_from_this()](beast::error_code ec, size_t) {
        self->writing_ = false;
        self->sse_sr_.reset();
        self->sse_res_.reset();
        if (ec || !self->keep_alive_ || self->st_.draining) return self->close();
        self->end_requested_ = self->end_written_ = false;
        self->read(false);
      });
    }
  }

  void client_gone() {
    if (!closed_) count(499);
    if (rs_cancel_) rs_cancel_->store(true);
    out_.clear();
    close();
  }

  beast::tcp_stream stream_;
  net::steady_timer timer_;
  bool timed_out_ = false;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  server_state& st_;
  const http_config& cfg_;
  const completion_service& svc_;
  bool closed_ = false;
  bool head_ = false;  ///< the request being answered is HEAD: no content in the answer
  bool keep_alive_ = true;
  // disconnect watch
  bool watching_ = false;
  std::optional<std::function<void()>> pending_;
  // streaming
  std::shared_ptr<http::response<http::empty_body>> sse_res_;
  std::shared_ptr<http::response_serializer<http::empty_body>> sse_sr_;
  uint64_t stream_id_ = 0;  ///< the request whose stream is open (ids start at 1)
  std::deque<std::shared_ptr<std::string>> out_;
  bool writing_ = false, end_requested_ = false, end_written_ = false;
  std::shared_ptr<std::atomic<bool>> rs_cancel_;
  std::string_view route_ = "other";  ///< of the request being answered (metrics)
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace

const std::vector<route_info>& routes() {
  static const std::vector<route_info> all{
      {"GET", "/healthz", false, false},          {"GET", "/readyz", false, false},
      {"GET", "/v1/models", false, true},         {"POST", "/v1/completions", false, true},
      {"POST", "/v1/chat/completions", false, true}, {"POST", "/tokenize", false, true},
      {"POST", "/detokenize", false, true},       {"POST", "/admin/rebalance", true, false},
      {"GET", "/admin/cluster", true, false},     {"GET", "/metrics", false, false},
      {"GET", "/dashboard", false, false},        {"GET", "/dashboard/data", false, false},
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
  server_state st;
  net::io_context io;
  tcp::acceptor acceptor{io};
  std::vector<std::thread> threads;
  uint16_t port = 0;

  void accept() {
    acceptor.async_accept(net::make_strand(io), [this](beast::error_code ec, tcp::socket s) {
      if (ec) return;  // acceptor closed
      if (st.connections >= st.cfg.max_connections) {
        // Over the limit: a short answer, then close (never left waiting).
        static const std::string busy =
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
            "Content-Length: 97\r\n\r\n{\"error\":{\"type\":\"server_error\",\"message\":\"too many connections\",\"param\":null,\"code\":null}}";
        beast::error_code ignored;
        net::write(s, net::buffer(busy), ignored);
        s.shutdown(tcp::socket::shutdown_both, ignored);
      } else {
        std::make_shared<session>(std::move(s), st)->run();
      }
      accept();
    });
  }
};

http_server::http_server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
http_server::~http_server() { stop(); }

caf::expected<std::unique_ptr<http_server>> http_server::start(const http_config& cfg, completion_service svc) {
  auto p = std::make_unique<impl>();
  p->st.cfg = cfg;
  p->st.svc = std::move(svc);
  auto& lim = p->st.limits;
  lim.model_name = p->st.svc.model_name;
  lim.vocab_size = p->st.svc.vocab_size;
  lim.max_context = p->st.svc.max_context;
  lim.max_prompt_tokens = cfg.max_prompt_tokens;
  lim.max_tokens = cfg.max_tokens;
  lim.max_choices = cfg.max_choices;
  lim.tokenizer = p->st.svc.tokenizer.get();
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

void http_server::drain() { impl_->st.draining = true; }

int http_server::active_requests() const { return impl_->st.active; }

void http_server::stop() {
  if (!impl_ || impl_->threads.empty()) return;
  // An admin call still running would post its answer to a destroyed context: let it end first.
  for (int i = 0; i < 6000 && impl_->st.admin_busy > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  net::post(impl_->io, [p = impl_.get()] {
    beast::error_code ec;
    p->acceptor.close(ec);
  });
  impl_->io.stop();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
}

}  // namespace sy::api
