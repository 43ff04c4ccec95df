#include "test_util.hpp"

#include "transport/ucx_link.hpp"

#include <catch2/catch.hpp>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <fcntl.h>
#include <poll.h>
#include <random>
#include <stdexcept>
#include <signal.h>
#include <sys/resource.h>
#include <thread>
#include <sys/wait.h>
#include <unistd.h>

namespace sy::transport::test {

namespace {

// Helpers run on several threads, where Catch's assertion macros are not safe.
[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "test helper failed: %s\n", why.c_str());
  std::abort();
}

}  // namespace

request make_request(uint64_t batch_id, std::vector<uint32_t> rows_per_segment, uint32_t hidden, wire_dtype dtype,
                     uint32_t seed) {
  batch_header h;
  h.batch_id = batch_id;
  h.epoch = 7;
  h.layer = 3;
  h.hidden = hidden;
  h.dtype = dtype;
  for (uint32_t i = 0; i < rows_per_segment.size(); ++i) h.segments.push_back({i, 100 + i, 1, rows_per_segment[i]});
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(h.total_rows() * hidden);
  for (auto& v : x) v = dist(rng);
  auto b = make_batch(std::move(h), x);
  if (!b) die("make_request: " + describe(b.error()));
  request r;
  static_cast<token_batch&>(r) = std::move(*b);
  return r;
}

reply negate(request req) {
  reply rep;
  static_cast<token_batch&>(rep) = std::move(req);
  const size_t es = dtype_bytes(rep.header.dtype);
  auto bytes = rep.rows.bytes();
  for (size_t i = es - 1; i < bytes.size(); i += es) bytes[i] ^= std::byte{0x80};
  return rep;
}

bool is_negation_of(const request& req, const reply& rep) {
  if (check_reply(req.header, rep.header)) return false;
  if (req.rows.size() != rep.rows.size()) return false;
  const size_t es = dtype_bytes(req.header.dtype);
  auto a = req.rows.bytes();
  auto b = rep.rows.bytes();
  for (size_t i = 0; i < a.size(); ++i) {
    const auto expect = (i % es == es - 1) ? (a[i] ^ std::byte{0x80}) : a[i];
    if (b[i] != expect) return false;
  }
  return true;
}

request clone(const request& r) {
  auto b = make_batch(r.header);
  if (!b) die("clone: " + describe(b.error()));
  if (r.rows.size() != 0) std::memcpy(b->rows.data(), r.rows.data(), r.rows.size());
  request c;
  static_cast<token_batch&>(c) = std::move(*b);
  return c;
}

child_server child_server::start(bool peer_error_handling) {
  int status[2];
  int control[2];
  REQUIRE(::pipe2(status, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(control, O_CLOEXEC) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // dup2 clears close-on-exec on the copies the child keeps.
    ::dup2(status[1], 3);
    ::dup2(control[0], 4);
    const char* argv[] = {"transport_tests", "--child-server", peer_error_handling ? "peer" : "none", nullptr};
    ::execv("/proc/self/exe", const_cast<char* const*>(argv));
    ::_exit(127);
  }
  ::close(status[1]);
  ::close(control[0]);
  child_server c;
  c.pid = pid;
  c.status_fd = status[0];
  c.control_fd = control[1];
  uint8_t port[2] = {0, 0};
  size_t got = 0;
  while (got < 2) {
    pollfd p{c.status_fd, POLLIN, 0};
    REQUIRE(::poll(&p, 1, 10000) == 1);
    const ssize_t n = ::read(c.status_fd, port + got, 2 - got);
    REQUIRE(n > 0);
    got += static_cast<size_t>(n);
  }
  c.port = static_cast<uint16_t>(port[0] | port[1] << 8);
  return c;
}

bool child_server::wait_for(char what, std::chrono::milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd p{status_fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) != 1) return false;
    char c = 0;
    if (::read(status_fd, &c, 1) != 1) return false;
    if (c == what) return true;
  }
}

int child_server::stop() {
  if (control_fd >= 0) ::close(control_fd);
  control_fd = -1;
  int status = 0;
  if (pid > 0 && ::waitpid(pid, &status, 0) != pid) status = -1;
  pid = -1;
  if (status_fd >= 0) ::close(status_fd);
  status_fd = -1;
  return status;
}

void child_server::kill_now() {
  if (pid > 0) ::kill(pid, SIGKILL);
}

int child_server_main(int argc, char** argv) {
  const bool peer = argc > 2 && std::strcmp(argv[2], "peer") == 0;
  auto rt = ucx_runtime::make();
  if (!rt) return 2;
  std::mutex mu;
  std::condition_variable never;
  auto handler = [&](request req) -> caf::expected<reply> {
    if (req.header.layer == blocking_layer) {
      const char b = 'B';
      [[maybe_unused]] auto n = ::write(3, &b, 1);
      std::unique_lock lock(mu);
      never.wait(lock, [] { return false; });
    }
    return negate(std::move(req));
  };
  ucx_server_options opts;
  opts.peer_error_handling = peer;
  opts.workers = 1;
  auto server = ucx_server::make(*rt, handler, opts);
  if (!server) return 3;
  const uint16_t port = (*server)->port();
  const uint8_t bytes[2] = {static_cast<uint8_t>(port & 0xff), static_cast<uint8_t>(port >> 8)};
  if (::write(3, bytes, 2) != 2) return 4;
  char c;
  while (::read(4, &c, 1) > 0) {
  }
  // The control pipe closed: leave without waiting for blocked handlers.
  ::_exit(0);
}

int throwing_callback_main() {
  const rlimit no_core{0, 0};
  ::setrlimit(RLIMIT_CORE, &no_core);  // the expected abort leaves no core file behind
  auto server_rt = ucx_runtime::make();
  // The waiting caller keeps driving its runtime (no hand-back to the progress thread), so the
  // throwing callback runs on the caller's thread, inside call_sync.
  ucx_runtime_options co;
  co.spin_awaiting = std::chrono::seconds(10);
  auto client_rt = ucx_runtime::make(co);
  if (!server_rt || !client_rt) return 2;
  ucx_server_options so;
  so.workers = 2;
  auto server = ucx_server::make(*server_rt, [](request req) -> caf::expected<reply> {
    std::this_thread::sleep_for(std::chrono::milliseconds(req.header.layer == 1 ? 50 : 500));
    return negate(std::move(req));
  }, so);
  if (!server) return 3;
  auto client = ucx_client::make(*client_rt, "127.0.0.1", (*server)->port());
  if (!client) return 4;
  auto quick = make_request(1, {1});
  quick.header.layer = 1;
  (*client)->send(std::move(quick), std::chrono::seconds(5), [](caf::expected<reply>) { throw std::runtime_error("a callback bug"); });
  auto slow = make_request(2, {1});
  slow.header.layer = 2;
  try {
    (void)(*client)->call_sync(std::move(slow), std::chrono::seconds(5));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "the callback's exception left call_sync: %s\n", e.what());
    ::_exit(5);
  }
  ::_exit(0);
}

}  // namespace sy::transport::test
