#include "transport/inproc_link.hpp"

#include "transport/internal/counters.hpp"
#include "transport/internal/deadline_timer.hpp"
#include "transport/internal/worker_pool.hpp"

#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

namespace sy::transport {

using clock = std::chrono::steady_clock;

struct inproc_server::state {
  request_handler handler;
  inproc_options options;
  internal::link_counters counters;
  std::atomic<bool> stopped{false};
  std::atomic<size_t> clients{0};
  std::optional<internal::worker_pool> pool;
  std::optional<internal::deadline_timer> timer;
};

namespace {

class inproc_client;

/// One request in flight. Whoever flips `done` first delivers the outcome.
struct call_state {
  std::weak_ptr<inproc_client> client;  // weak: the client owns its pending calls
  batch_header req;                       // rows moved to the handler; header kept for check_reply
  reply_callback callback;
  clock::time_point deadline;
  uint64_t timer_id = 0;
  std::atomic<bool> done{false};
};

class inproc_client : public std::enable_shared_from_this<inproc_client> {
 public:
  explicit inproc_client(std::shared_ptr<inproc_server::state> server) : server_(std::move(server)) {
    server_->clients.fetch_add(1);
  }
  ~inproc_client() { server_->clients.fetch_sub(1); }

  void send(request req, std::chrono::milliseconds timeout, reply_callback cb);
  void close();
  bool is_open() const { return open_.load() && !server_->stopped.load(); }
  link_stats stats() const { return counters_.snapshot(); }

  /// Delivers `result` unless the call already completed.
  void complete(const std::shared_ptr<call_state>& call, caf::expected<reply> result);

 private:
  void fail_now(reply_callback& cb, caf::error err) {
    counters_.count_error(err);
    cb(std::move(err));
  }

  std::shared_ptr<inproc_server::state> server_;
  internal::link_counters counters_;
  std::atomic<bool> open_{true};
  std::mutex mu_;
  std::unordered_map<uint64_t, std::shared_ptr<call_state>> pending_;
};

/// Completes its call with `link_closed` if destroyed before running (a stopped pool drops tasks).
struct completion_guard {
  std::shared_ptr<call_state> call;
  completion_guard(std::shared_ptr<call_state> c) : call(std::move(c)) {}
  completion_guard(completion_guard&&) = default;
  ~completion_guard() {
    if (call && !call->done.load())
      if (auto client = call->client.lock())
        client->complete(call, make_error(wire_errc::link_closed, "inproc: the server stopped"));
  }
};

caf::expected<reply> finish_reply(const batch_header& req, caf::expected<reply> r, const wire_limits& limits) {
  if (!r) return r;
  r->header.batch_id = req.batch_id;
  r->header.epoch = req.epoch;
  r->header.layer = req.layer;
  if (auto err = validate(r->header, r->rows.size(), limits))
    return make_error(wire_errc::handler_failed, "inproc: the handler's reply is invalid: " + describe(err));
  if (auto err = check_reply(req, r->header)) return err;
  return r;
}

void inproc_client::send(request req, std::chrono::milliseconds timeout, reply_callback cb) {
  if (!is_open()) return fail_now(cb, make_error(wire_errc::link_closed, "inproc: the link is closed"));
  if (auto err = validate(req.header, req.rows.size(), server_->options.limits)) return fail_now(cb, std::move(err));
  auto call = std::make_shared<call_state>();
  call->client = shared_from_this();
  call->req = req.header;
  call->callback = std::move(cb);
  call->deadline = clock::now() + timeout;
  {
    std::lock_guard lock(mu_);
    if (!pending_.emplace(req.header.batch_id, call).second) {
      return fail_now(call->callback, make_error(wire_errc::duplicate_batch,
                                                 "inproc: batch " + std::to_string(req.header.batch_id) +
                                                     " is already pending on this link"));
    }
  }
  const uint64_t bytes = req.header.header_bytes() + req.rows.size();
  internal::link_counters::bump(counters_.requests_sent);
  internal::link_counters::bump(counters_.bytes_sent, bytes);
  internal::link_counters::bump(server_->counters.requests_received);
  internal::link_counters::bump(server_->counters.bytes_received, bytes);

  auto* server = server_.get();
  if (!server->pool) {
    auto r = finish_reply(call->req, server->handler(std::move(req)), server->options.limits);
    if (r && clock::now() > call->deadline)
      r = make_error(wire_errc::timeout, "inproc: the handler took longer than the timeout");
    complete(call, std::move(r));
    return;
  }
  call->timer_id = server->timer->schedule(call->deadline, [call] {
    if (auto client = call->client.lock())
      client->complete(call, make_error(wire_errc::timeout, "inproc: no reply for batch " +
                                                                std::to_string(call->req.batch_id) + " in time"));
  });
  completion_guard guard(call);
  server->pool->submit([guard = std::move(guard), req = std::move(req), server]() mutable {
    auto& call = guard.call;
    if (call->done.load()) return;  // timed out while queued: skip the work
    auto r = finish_reply(call->req, server->handler(std::move(req)), server->options.limits);
    if (auto client = call->client.lock()) client->complete(call, std::move(r));
  });
}

void inproc_client::complete(const std::shared_ptr<call_state>& call, caf::expected<reply> result) {
  if (call->done.exchange(true)) {
    if (result) internal::link_counters::bump(counters_.late_replies);
    return;
  }
  {
    std::lock_guard lock(mu_);
    pending_.erase(call->req.batch_id);
  }
  if (call->timer_id != 0 && server_->timer) server_->timer->cancel(call->timer_id);
  auto& sc = server_->counters;
  if (result) {
    const uint64_t bytes = result->header.header_bytes() + result->rows.size();
    internal::link_counters::bump(counters_.replies_received);
    internal::link_counters::bump(counters_.bytes_received, bytes);
    internal::link_counters::bump(sc.replies_sent);
    internal::link_counters::bump(sc.bytes_sent, bytes);
  } else {
    counters_.count_error(result.error());
    const auto code = wire_code(result.error());
    if (code != wire_errc::timeout && code != wire_errc::link_closed) {
      internal::link_counters::bump(counters_.errors_received);
      internal::link_counters::bump(sc.errors_sent);
      sc.count_error(result.error());
    }
  }
  auto cb = std::move(call->callback);
  cb(std::move(result));
}

void inproc_client::close() {
  if (open_.exchange(false)) internal::link_counters::bump(counters_.links_closed);
  std::unordered_map<uint64_t, std::shared_ptr<call_state>> pending;
  {
    std::lock_guard lock(mu_);
    pending = pending_;
  }
  for (auto& [id, call] : pending) complete(call, make_error(wire_errc::link_closed, "inproc: the link was closed"));
}

/// The public face: owns the shared client state and closes it when dropped.
class inproc_link_client final : public link_client {
 public:
  explicit inproc_link_client(std::shared_ptr<inproc_client> c) : client_(std::move(c)) {}
  ~inproc_link_client() override { client_->close(); }
  void send(request req, std::chrono::milliseconds timeout, reply_callback cb) override {
    client_->send(std::move(req), timeout, std::move(cb));
  }
  link_stats stats() const override { return client_->stats(); }
  bool is_open() const override { return client_->is_open(); }
  void close() override { client_->close(); }

 private:
  std::shared_ptr<inproc_client> client_;
};

}  // namespace

caf::expected<std::unique_ptr<inproc_server>> inproc_server::make(request_handler handler, inproc_options options) {
  if (!handler) return make_error(wire_errc::invalid_argument, "inproc: a server needs a handler");
  auto s = std::make_shared<state>();
  s->handler = std::move(handler);
  s->options = options;
  if (options.workers > 0) {
    s->pool.emplace(options.workers);
    s->timer.emplace();
  }
  return std::unique_ptr<inproc_server>(new inproc_server(std::move(s)));
}

inproc_server::~inproc_server() { stop(); }

std::unique_ptr<link_client> inproc_server::connect() {
  return std::make_unique<inproc_link_client>(std::make_shared<inproc_client>(state_));
}

link_stats inproc_server::stats() const { return state_->counters.snapshot(); }

size_t inproc_server::connections() const { return state_->stopped.load() ? 0 : state_->clients.load(); }

void inproc_server::stop() {
  if (state_->stopped.exchange(true)) return;
  // Dropping the queued tasks completes their calls with link_closed (completion_guard).
  if (state_->pool) state_->pool->stop();
  if (state_->timer) state_->timer->stop();
}

}  // namespace sy::transport
