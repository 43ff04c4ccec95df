#include "test_util.hpp"

#include "transport/internal/ucx_am.hpp"
#include "transport/ucx_link.hpp"

#include <catch2/catch.hpp>

#include <ucp/api/ucp.h>

#include <arpa/inet.h>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <mutex>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace sy::transport;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

std::shared_ptr<ucx_runtime> runtime() {
  auto rt = ucx_runtime::make();
  REQUIRE(rt);
  return *rt;
}

request_handler negate_handler() {
  return [](request r) -> caf::expected<reply> { return test::negate(std::move(r)); };
}

/// A UCX client that bypasses our link: it sends whatever bytes it is given as a request frame.
class raw_client {
 public:
  explicit raw_client(uint16_t port) {
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_AM;
    REQUIRE(ucp_init(&p, nullptr, &ctx_) == UCS_OK);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    REQUIRE(ucp_worker_create(ctx_, &wp, &worker_) == UCS_OK);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    ep.sockaddr.addrlen = sizeof sa;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t) { static_cast<raw_client*>(arg)->failed_ = true; };
    ep.err_handler.arg = this;
    REQUIRE(ucp_ep_create(worker_, &ep, &ep_) == UCS_OK);
  }
  ~raw_client() {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    wait(ucp_ep_close_nbx(ep_, &p));
    ucp_worker_destroy(worker_);
    ucp_cleanup(ctx_);
  }
  void send(const std::vector<std::byte>& header, const std::vector<std::byte>& payload) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    wait(ucp_am_send_nbx(ep_, internal::am_id_request, header.data(), header.size(), payload.data(), payload.size(), &p));
  }
  /// Drives the worker until the server dropped the connection, or `timeout` passed.
  bool wait_dropped(std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    while (!failed_ && clock_type::now() < deadline) ucp_worker_progress(worker_);
    return failed_;
  }

 private:
  void wait(ucs_status_ptr_t sp) {
    if (!UCS_PTR_IS_PTR(sp)) return;
    const auto deadline = clock_type::now() + 5s;
    while (ucp_request_check_status(sp) == UCS_INPROGRESS && clock_type::now() < deadline) ucp_worker_progress(worker_);
    ucp_request_free(sp);
  }
  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  bool failed_ = false;
};

uint16_t unused_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  socklen_t len = sizeof sa;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  ::close(fd);
  return ntohs(sa.sin_port);
}

void round_trips(link_client& link, uint64_t& id) {
  for (auto dtype : {wire_dtype::bf16, wire_dtype::f32}) {
    // 8 KiB eager up to 4 MiB rendezvous (512 rows × 4096 bf16), one and several segments; 12
    // segments make a header beyond the 8 a frame encodes in place (its header goes to a vector).
    for (std::vector<uint32_t> rows :
         {std::vector<uint32_t>{1}, {3, 5}, {64}, {200, 312}, std::vector<uint32_t>(12, 2)}) {
      if (dtype == wire_dtype::f32 && rows.size() > 1 && rows[0] == 200) continue;
      auto req = test::make_request(id, rows, 4096, dtype, static_cast<uint32_t>(id));
      ++id;
      auto copy = test::clone(req);
      auto rep = link.call(std::move(req), 10s).get();
      REQUIRE(rep);
      CHECK(test::is_negation_of(copy, *rep));
    }
  }
}

}  // namespace

TEST_CASE("ucx: loopback in one process round-trips eager and rendezvous batches, with and without peer error handling",
          "[transport][ucx]") {
  for (bool peer : {true, false}) {
    INFO("peer error handling " << peer);
    auto server_rt = runtime();
    auto client_rt = runtime();
    ucx_server_options so;
    so.peer_error_handling = peer;
    auto server = ucx_server::make(server_rt, negate_handler(), so);
    REQUIRE(server);
    CHECK((*server)->port() != 0);
    ucx_client_options co;
    co.peer_error_handling = peer;
    auto client = ucx_client::make(client_rt, "127.0.0.1", (*server)->port(), co);
    REQUIRE(client);
    uint64_t id = 1;
    round_trips(**client, id);
    const auto cs = (*client)->stats();
    const auto ss = (*server)->stats();
    CHECK(cs.requests_sent == id - 1);
    CHECK(cs.replies_received == id - 1);
    CHECK(ss.requests_received == id - 1);
    CHECK(cs.bytes_sent == ss.bytes_received);
    CHECK(cs.bytes_received == ss.bytes_sent);
    CHECK(cs.bytes_sent == cs.bytes_received);
    CHECK(cs.errors_total() == 0);
    CHECK(ss.errors_total() == 0);
    CHECK((*server)->connections() == 1);
    REQUIRE((*server)->connection_stats().size() == 1);
    CHECK((*server)->connection_stats()[0].requests_received == id - 1);
  }
}

TEST_CASE("ucx: call_sync drives the worker from the waiting thread, alone or beside other callers",
          "[transport][ucx]") {
  for (unsigned workers : {0u, 1u}) {
    INFO("server workers " << workers);
    // One runtime for the server and all clients: waiting callers also drive the server's side.
    auto rt = runtime();
    ucx_server_options so;
    so.workers = workers;
    auto server = ucx_server::make(rt, negate_handler(), so);
    REQUIRE(server);
    std::vector<std::unique_ptr<ucx_client>> links;
    for (int i = 0; i < 3; ++i) {
      auto c = ucx_client::make(rt, "127.0.0.1", (*server)->port());
      REQUIRE(c);
      links.push_back(std::move(*c));
    }
    std::atomic<int> bad{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        auto& link = *links[static_cast<size_t>(t) % links.size()];
        for (uint32_t i = 0; i < 60; ++i) {
          const uint64_t id = 100000u * static_cast<uint64_t>(t + 1) + i;
          // Mostly eager, every 8th rendezvous (256 rows × 1024 bf16 = 512 KiB).
          auto req = test::make_request(id, {i % 8 == 0 ? 256u : 1 + i % 5}, 1024, wire_dtype::bf16, i);
          auto copy = test::clone(req);
          if (t == 3) {  // one thread mixes in the asynchronous path
            auto rep = link.call(std::move(req), 10s).get();
            if (!rep || !test::is_negation_of(copy, *rep)) ++bad;
            continue;
          }
          auto rep = link.call_sync(std::move(req), 10s);
          if (!rep || !test::is_negation_of(copy, *rep)) ++bad;
        }
      });
    }
    for (auto& th : threads) th.join();
    CHECK(bad.load() == 0);
    CHECK((*server)->stats().requests_received == 240);
  }
}

TEST_CASE("ucx: call_sync reports timeouts and refuses to run inside a callback", "[transport][ucx]") {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  auto server_rt = runtime();
  auto client_rt = runtime();
  auto server = ucx_server::make(server_rt, [&](request r) -> caf::expected<reply> {
    if (r.header.layer == test::blocking_layer) {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return release; });
    }
    return test::negate(std::move(r));
  });
  REQUIRE(server);
  auto client = ucx_client::make(client_rt, "127.0.0.1", (*server)->port());
  REQUIRE(client);
  auto& link = **client;
  auto slow = test::make_request(1, {1});
  slow.header.layer = test::blocking_layer;
  const auto t0 = clock_type::now();
  auto r = link.call_sync(std::move(slow), 100ms);
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::timeout);
  CHECK(clock_type::now() - t0 < 1s);
  {
    std::lock_guard lock(mu);
    release = true;
  }
  cv.notify_all();

  std::promise<caf::error> nested;
  link.send(test::make_request(2, {1}), 5s, [&](caf::expected<reply> rep) {
    if (!rep) {
      nested.set_value(rep.error());
      return;
    }
    auto inner = link.call_sync(test::make_request(3, {1}), 5s);
    nested.set_value(inner ? caf::error{} : inner.error());
  });
  auto err = nested.get_future().get();
  CHECK(wire_code(err) == wire_errc::invalid_argument);
  CHECK(link.call_sync(test::make_request(4, {2}), 5s));
}

TEST_CASE("ucx: a reply callback that throws ends the process, also when a waiting caller drives", "[transport][ucx][process]") {
  // The alternative, the exception leaving call_sync, would leave the worker without a driver for
  // good (see ucx_link.cpp, pass). The child reports which of the outcomes it saw.
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const char* argv[] = {"transport_tests", "--child-throwing-callback", nullptr};
    ::execv("/proc/self/exe", const_cast<char* const*>(argv));
    ::_exit(127);
  }
  int status = 0;
  pid_t done = 0;
  for (int i = 0; i < 300 && (done = ::waitpid(pid, &status, WNOHANG)) == 0; ++i) std::this_thread::sleep_for(100ms);
  if (done == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL("the child neither ended nor returned within 30 s");
  }
  INFO("exit status " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1) << ", signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
  const bool aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
  CHECK(aborted);
}

TEST_CASE("ucx: many requests in flight are matched to their replies by batch id", "[transport][ucx]") {
  auto server_rt = runtime();
  auto client_rt = runtime();
  ucx_server_options so;
  so.workers = 2;
  auto server = ucx_server::make(server_rt, negate_handler(), so);
  REQUIRE(server);
  auto client = ucx_client::make(client_rt, "127.0.0.1", (*server)->port());
  REQUIRE(client);
  std::vector<request> copies;
  std::vector<std::future<caf::expected<reply>>> futures;
  for (uint32_t i = 0; i < 48; ++i) {
    auto req = test::make_request(1000 + i, {1 + (i * 37) % 97, 1 + i % 5}, 1024, wire_dtype::bf16, i);
    copies.push_back(test::clone(req));
    futures.push_back((*client)->call(std::move(req), 10s));
  }
  for (size_t i = 0; i < futures.size(); ++i) {
    auto rep = futures[i].get();
    REQUIRE(rep);
    CHECK(rep->header.batch_id == 1000 + i);
    CHECK(test::is_negation_of(copies[i], *rep));
  }
}

TEST_CASE("ucx: handler errors, invalid replies, duplicates and timeouts fail with typed errors", "[transport][ucx]") {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  slot_inventory inv;
  for (uint32_t e = 0; e < 4; ++e) inv.add({100 + e, 3, e, 1, 64});
  auto server_rt = runtime();
  auto client_rt = runtime();
  auto server = ucx_server::make(server_rt, [&](request r) -> caf::expected<reply> {
    if (r.header.layer == test::blocking_layer) {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return release; });
      return test::negate(std::move(r));
    }
    if (auto err = inv.check(r.header)) return err;
    if (r.header.batch_id == 66) {  // a buggy handler: answers in another dtype
      auto rep = test::negate(std::move(r));
      rep.header.dtype = wire_dtype::f32;
      return rep;
    }
    return test::negate(std::move(r));
  });
  REQUIRE(server);
  auto client = ucx_client::make(client_rt, "127.0.0.1", (*server)->port());
  REQUIRE(client);
  auto& link = **client;

  auto unknown = test::make_request(1, {1, 1});
  unknown.header.segments[1].version = 2;
  auto r = link.call(std::move(unknown), 5s).get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::version_mismatch);
  CHECK(describe(r.error()).find("version") != std::string::npos);
  r = link.call(test::make_request(2, {1, 1, 1, 1, 1}), 5s).get();  // expert 4 is not held
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::unknown_expert);
  r = link.call(test::make_request(66, {2}), 5s).get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::handler_failed);

  auto invalid = test::make_request(3, {2});
  invalid.header.hidden = 32;  // disagrees with the rows: refused before sending
  r = link.call(std::move(invalid), 5s).get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::length_mismatch);

  auto slow = test::make_request(10, {1});
  slow.header.layer = test::blocking_layer;
  auto slow_future = link.call(std::move(slow), 150ms);
  r = link.call(test::make_request(10, {1}), 5s).get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::duplicate_batch);
  const auto t0 = clock_type::now();
  r = slow_future.get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::timeout);
  CHECK(clock_type::now() - t0 < 1s);
  {
    std::lock_guard lock(mu);
    release = true;
  }
  cv.notify_all();
  // The single worker answers the late request first; the next reply proves it arrived and was dropped.
  CHECK(link.call(test::make_request(11, {1}), 5s).get());
  const auto s = link.stats();
  CHECK(s.late_replies == 1);
  CHECK(s.errors_received == 3);
  CHECK(s.error_count(wire_errc::timeout) == 1);
  CHECK(s.error_count(wire_errc::duplicate_batch) == 1);
  CHECK(s.error_count(wire_errc::version_mismatch) == 1);
  CHECK(link.is_open());  // none of these close the link
  CHECK((*server)->stats().errors_sent == 3);
}

TEST_CASE("ucx: closing a link fails its pending requests with link_closed, and a stopped server refuses", "[transport][ucx]") {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  int entered = 0;  // blocked handlers running, under mu
  auto server_rt = runtime();
  auto client_rt = runtime();
  auto server = ucx_server::make(server_rt, [&](request r) -> caf::expected<reply> {
    if (r.header.layer == test::blocking_layer) {
      std::unique_lock lock(mu);
      ++entered;
      cv.notify_all();
      cv.wait(lock, [&] { return release; });
    }
    return test::negate(std::move(r));
  });
  REQUIRE(server);
  auto client = ucx_client::make(client_rt, "127.0.0.1", (*server)->port());
  REQUIRE(client);
  auto blocked = test::make_request(1, {1});
  blocked.header.layer = test::blocking_layer;
  auto pending = (*client)->call(std::move(blocked), 10s);
  auto wait_entered = [&](int n) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, 5s, [&] { return entered >= n; });
  };
  REQUIRE(wait_entered(1));
  (*client)->close();
  auto r = pending.get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::link_closed);
  r = (*client)->call(test::make_request(2, {1}), 1s).get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::link_closed);

  // Stopping the server closes its connections at once: a client waiting on a handler that is
  // still running (blocked) sees its endpoint fail, without waiting for the handler.
  auto client2 = ucx_client::make(client_rt, "127.0.0.1", (*server)->port());
  REQUIRE(client2);
  auto blocked2 = test::make_request(3, {1});
  blocked2.header.layer = test::blocking_layer;
  auto pending2 = (*client2)->call(std::move(blocked2), 10s);
  // The server holds the request (queued behind the blocked handler) before it stops; else the call
  // could start on an endpoint that had already failed, which is a call on a closed link.
  for (int i = 0; i < 5000 && (*server)->stats().requests_received < 2; ++i) std::this_thread::sleep_for(1ms);
  REQUIRE((*server)->stats().requests_received == 2);
  std::thread stopper([&] { (*server)->stop(); });  // returns once the blocked handler is released
  REQUIRE(pending2.wait_for(2s) == std::future_status::ready);
  r = pending2.get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::peer_failed);
  {
    std::lock_guard lock(mu);
    release = true;
  }
  cv.notify_all();
  stopper.join();
  CHECK((*server)->connections() == 0);
  ucx_client_options co;
  co.connect_timeout = 1s;
  auto refused = ucx_client::make(client_rt, "127.0.0.1", (*server)->port(), co);
  REQUIRE_FALSE(refused);
  CHECK(wire_code(refused.error()) == wire_errc::connect_failed);
}

TEST_CASE("ucx: connecting to a port nobody listens on fails with connect_failed", "[transport][ucx]") {
  auto rt = runtime();
  ucx_client_options co;
  co.connect_timeout = 2s;
  const auto t0 = clock_type::now();
  auto c = ucx_client::make(rt, "127.0.0.1", unused_port(), co);
  REQUIRE_FALSE(c);
  CHECK(wire_code(c.error()) == wire_errc::connect_failed);
  CHECK(clock_type::now() - t0 < co.connect_timeout + 3s);  // bounded by the option, not hanging
  auto bad = ucx_client::make(rt, "not-an-address", 1, co);
  REQUIRE_FALSE(bad);
  CHECK(wire_code(bad.error()) == wire_errc::invalid_argument);
}

TEST_CASE("ucx: a server in another process answers eager and rendezvous batches", "[transport][ucx][process]") {
  auto child = test::child_server::start();
  {
    auto rt = runtime();
    auto client = ucx_client::make(rt, "127.0.0.1", child.port);
    REQUIRE(client);
    uint64_t id = 1;
    round_trips(**client, id);
    for (uint32_t rows : {1u, 512u}) {  // the same over call_sync
      auto req = test::make_request(id++, {rows}, 4096);
      auto copy = test::clone(req);
      auto rep = (*client)->call_sync(std::move(req), 10s);
      REQUIRE(rep);
      CHECK(test::is_negation_of(copy, *rep));
    }
    CHECK((*client)->stats().replies_received == id - 1);
  }
  CHECK(child.stop() == 0);
}

TEST_CASE("ucx: a peer killed with SIGKILL mid-stream fails every pending request at once with peer_failed",
          "[transport][ucx][process]") {
  auto child = test::child_server::start();
  auto rt = runtime();
  auto client = ucx_client::make(rt, "127.0.0.1", child.port);
  REQUIRE(client);
  auto& link = **client;
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(link.call(test::make_request(i, {8}, 4096), 5s).get());

  // One request blocks the child's only worker; the others queue behind it, some with 4 MiB rows.
  std::vector<std::future<caf::expected<reply>>> pending;
  for (uint64_t i = 0; i < 8; ++i) {
    auto req = test::make_request(100 + i, {i % 2 ? 512u : 4u}, 4096);
    req.header.layer = test::blocking_layer;
    pending.push_back(link.call(std::move(req), 30s));
  }
  REQUIRE(child.wait_for('B', 5s));
  // And one caller blocked in call_sync, driving the worker while the peer dies.
  auto sync_req = test::make_request(150, {2}, 4096);
  sync_req.header.layer = test::blocking_layer;
  std::promise<caf::error> sync_outcome;
  std::thread sync_caller([&] {
    auto r = link.call_sync(std::move(sync_req), 30s);
    sync_outcome.set_value(r ? caf::error{} : r.error());
  });
  auto sync_future = sync_outcome.get_future();
  while (link.stats().requests_sent < 4 + 8 + 1) std::this_thread::yield();  // it has been sent
  const auto t0 = clock_type::now();
  child.kill_now();
  for (auto& f : pending) {
    REQUIRE(f.wait_for(5s) == std::future_status::ready);
    auto r = f.get();
    REQUIRE_FALSE(r);
    CHECK(wire_code(r.error()) == wire_errc::peer_failed);
  }
  REQUIRE(sync_future.wait_for(5s) == std::future_status::ready);
  CHECK(wire_code(sync_future.get()) == wire_errc::peer_failed);
  sync_caller.join();
  // peer_failed, not timeout: the death was detected on the link, well before the 30 s deadlines
  // (how fast is a matter for the benchmarks, not for a timed assertion).
  const auto elapsed = clock_type::now() - t0;
  WARN("pending requests failed " << std::chrono::duration_cast<std::chrono::microseconds>(elapsed).count()
                                  << " us after SIGKILL");
  CHECK_FALSE(link.is_open());
  auto after = link.call(test::make_request(200, {1}), 1s).get();
  REQUIRE_FALSE(after);
  CHECK(wire_code(after.error()) == wire_errc::link_closed);
  CHECK(link.stats().error_count(wire_errc::peer_failed) == 9);
  child.stop();
}

TEST_CASE("ucx: a malformed frame closes only its connection while the server keeps answering others",
          "[transport][ucx]") {
  auto server_rt = runtime();
  auto client_rt = runtime();
  auto server = ucx_server::make(server_rt, negate_handler());
  REQUIRE(server);
  const uint16_t port = (*server)->port();
  auto good = ucx_client::make(client_rt, "127.0.0.1", port);
  REQUIRE(good);
  REQUIRE((*good)->call(test::make_request(1, {2}), 5s).get());

  auto valid = test::make_request(5, {3}, 64);
  const auto valid_header = encode_header(frame_kind::request, valid.header);
  const std::vector<std::byte> payload(valid.rows.bytes().begin(), valid.rows.bytes().end());
  struct bad_frame {
    const char* name;
    wire_errc reason;
    std::vector<std::byte> header;
    std::vector<std::byte> payload;
  };
  std::vector<bad_frame> frames;
  frames.push_back({"bad magic", wire_errc::bad_magic, valid_header, payload});
  frames.back().header[0] = std::byte{0};
  frames.push_back({"1 MiB payload for 3 rows", wire_errc::length_mismatch, valid_header,
                    std::vector<std::byte>(1 << 20)});
  frames.push_back({"a reply sent as a request", wire_errc::bad_kind, encode_header(frame_kind::reply, valid.header),
                    payload});
  frames.push_back({"garbage shorter than a header", wire_errc::truncated, std::vector<std::byte>(7), {}});

  uint64_t id = 10;
  for (const auto& f : frames) {
    INFO(f.name);
    raw_client raw(port);
    raw.send(f.header, f.payload);
    CHECK(raw.wait_dropped(5s));  // the server closed this connection (peer mode: the raw client sees it)
    CHECK((*server)->stats().error_count(f.reason) == 1);
    auto r = (*good)->call(test::make_request(id++, {4}), 5s).get();  // the other connection still works
    REQUIRE(r);
  }
  const auto s = (*server)->stats();
  CHECK(s.links_closed == frames.size());
  CHECK(s.requests_received == 1 + frames.size());
  CHECK((*server)->connections() == 1);
  CHECK((*good)->is_open());
}
