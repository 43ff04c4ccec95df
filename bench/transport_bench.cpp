// Round trips of token batches over the UCX link between two processes on one machine.
//
// The client process starts the server as a child (fork + exec of this binary with --serve; the
// bound port comes back through a pipe) and, for each batch size, measures:
//   - ping-pong: one request in flight; round-trip time p50/p99 and 2·payload/RTT in GB/s (the same
//     pattern as `ucx_perftest -t ucp_am_lat`, whose half round trip × 2 is the baseline);
//   - stream: `--window` requests (at most 8 MiB) in flight; payload GB/s in each direction (baseline:
//     `ucx_perftest -t ucp_am_bw`, one direction);
//   - memcpy: one copy of the payload, between two cache-hot buffers and through cold memory: what
//     one copy of the rows costs on this machine (TCP moves each byte through two copies, CMA one).
//   - cross-core: two threads of this process on the two processes' CPUs hand the payload back and
//     forth, each copying the other's buffer into its own: a round trip of two copies, (new) of
//     rows the other core has just written, as serving moves them, and (same) of buffers nobody
//     rewrites, as ucx_perftest's ping-pong does (its buffers are written once, so after the first
//     message each side's copy reads lines already in its own cache). Their difference is what
//     moving new rows between the cores costs beyond the baseline's pattern.
// The server's handler answers with the request's own rows (moved, not copied), so the reply
// carries the same bytes back. Lines starting with RESULT are for bench/transport_bench.sh.
// Allocations: this binary counts every `operator new`; RESULT gives the client's per round trip
// (ping-pong), and the server prints its per request served (SERVER line on stderr, at exit).
#include "transport/ucx_link.hpp"

#include <algorithm>
#include <utility>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <thread>
#include <random>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <limits>
#include <new>
#include <optional>
#include <vector>

using namespace sy::transport;
using clock_type = std::chrono::steady_clock;

// Counting allocator: every C++ allocation in this process (ours, CAF's, the standard library's).
namespace {
std::atomic<uint64_t> g_allocs{0};
void* counted(size_t n, size_t align) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  void* p = align <= alignof(std::max_align_t) ? std::malloc(n == 0 ? 1 : n)
                                                : std::aligned_alloc(align, (std::max<size_t>(n, 1) + align - 1) / align * align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace
void* operator new(size_t n) { return counted(n, 0); }
void* operator new[](size_t n) { return counted(n, 0); }
void* operator new(size_t n, std::align_val_t a) { return counted(n, static_cast<size_t>(a)); }
void* operator new[](size_t n, std::align_val_t a) { return counted(n, static_cast<size_t>(a)); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

struct options {
  std::vector<uint32_t> rows = {1, 8, 64, 512};
  uint32_t hidden = 4096;
  int iters = 0;  // 0: chosen per size
  int window = 8;
  bool peer = true;
  unsigned workers = 1;
  int client_spin_us = 0;
  int server_spin_us = 50;
  int awaiting_spin_us = 1000;
  int caller_spin_us = 0;
  bool sync = true;  // ping-pong with call_sync (the caller drives the worker) or call().get()
  bool stream = true;
  bool serve = false;
  int client_cpu = -1;  // pin the client process (all its threads) to this CPU; -1: no pinning
  int server_cpu = -1;  // the same for the server process
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--serve") {
      o.serve = true;
    } else if (a == "--rows") {
      o.rows.clear();
      std::string v = next();
      for (size_t p = 0; p < v.size();) {
        size_t q = v.find(',', p);
        o.rows.push_back(static_cast<uint32_t>(std::stoul(v.substr(p, q - p))));
        p = q == std::string::npos ? v.size() : q + 1;
      }
    } else if (a == "--hidden") {
      o.hidden = static_cast<uint32_t>(std::stoul(next()));
    } else if (a == "--iters") {
      o.iters = std::stoi(next());
    } else if (a == "--window") {
      o.window = std::stoi(next());
    } else if (a == "--peer") {
      o.peer = next() != "0";
    } else if (a == "--workers") {
      o.workers = static_cast<unsigned>(std::stoul(next()));
    } else if (a == "--client-spin-us") {
      o.client_spin_us = std::stoi(next());
    } else if (a == "--server-spin-us") {
      o.server_spin_us = std::stoi(next());
    } else if (a == "--stream") {
      o.stream = next() != "0";
    } else if (a == "--sync") {
      o.sync = next() != "0";
    } else if (a == "--caller-spin-us") {
      o.caller_spin_us = std::stoi(next());
    } else if (a == "--cpus") {  // CLIENT,SERVER
      const std::string v = next();
      const size_t comma = v.find(',');
      if (comma == std::string::npos) {
        std::fprintf(stderr, "--cpus takes CLIENT,SERVER (two CPU numbers)\n");
        std::exit(2);
      }
      o.client_cpu = std::stoi(v.substr(0, comma));
      o.server_cpu = std::stoi(v.substr(comma + 1));
    } else if (a == "--awaiting-spin-us") {
      o.awaiting_spin_us = std::stoi(next());
    } else {
      std::fprintf(stderr,
                   "usage: transport_bench [--rows 1,8,64,512] [--hidden 4096] [--iters N] [--window W]\n"
                   "                       [--peer 0|1] [--workers N] [--client-spin-us N] [--server-spin-us N]\n"
                   "                       [--awaiting-spin-us N] [--sync 0|1] [--caller-spin-us N] [--stream 0|1]\n"
                   "                       [--cpus CLIENT,SERVER]\n");
      std::exit(2);
    }
  }
  return o;
}

std::shared_ptr<ucx_runtime> make_runtime(const options& o, int spin_us) {
  ucx_runtime_options ro;
  ro.spin = std::chrono::microseconds(spin_us);
  ro.spin_awaiting = std::chrono::microseconds(o.awaiting_spin_us);
  auto rt = ucx_runtime::make(ro);
  if (!rt) {
    std::fprintf(stderr, "%s\n", describe(rt.error()).c_str());
    std::exit(1);
  }
  return *rt;
}

std::atomic<uint64_t> served{0}, allocs_at_first{0};

int serve(const options& o) {
  auto rt = make_runtime(o, o.server_spin_us);
  ucx_server_options so;
  so.peer_error_handling = o.peer;
  so.workers = o.workers;
  auto server = ucx_server::make(
      rt,
      [](request r) -> caf::expected<reply> {
        if (served.fetch_add(1, std::memory_order_relaxed) == 0) allocs_at_first.store(g_allocs.load());
        reply rep;
        static_cast<token_batch&>(rep) = std::move(r);
        return rep;
      },
      so);
  if (!server) {
    std::fprintf(stderr, "%s\n", describe(server.error()).c_str());
    return 1;
  }
  const uint16_t port = (*server)->port();
  if (::write(3, &port, sizeof port) != sizeof port) return 1;
  char c;
  while (::read(4, &c, 1) > 0) {
  }
  const uint64_t n = served.load();
  if (n > 1)
    std::fprintf(stderr, "SERVER requests=%llu allocs_per_request=%.2f\n", static_cast<unsigned long long>(n),
                 static_cast<double>(g_allocs.load() - allocs_at_first.load()) / static_cast<double>(n - 1));
  return 0;
}

/// Pins the calling thread (and the threads it starts later: before any, the whole process) to
/// `cpu`; -1 leaves it free.
void pin_to(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (::sched_setaffinity(0, sizeof set, &set) != 0) {
    std::perror("sched_setaffinity");
    std::exit(1);
  }
}

struct child {
  pid_t pid = -1;
  int control = -1;
  uint16_t port = 0;
};

child spawn_server(const options& o) {
  int status[2];
  int control[2];
  if (::pipe2(status, O_CLOEXEC) != 0 || ::pipe2(control, O_CLOEXEC) != 0) std::exit(1);
  const pid_t pid = ::fork();
  if (pid == 0) {
    pin_to(o.server_cpu);
    ::dup2(status[1], 3);
    ::dup2(control[0], 4);
    std::string workers = std::to_string(o.workers);
    std::string spin = std::to_string(o.server_spin_us);
    std::string awaiting = std::to_string(o.awaiting_spin_us);
    const char* argv[] = {"transport_bench", "--serve", "--peer", o.peer ? "1" : "0", "--workers", workers.c_str(),
                          "--server-spin-us", spin.c_str(), "--awaiting-spin-us", awaiting.c_str(), nullptr};
    ::execv("/proc/self/exe", const_cast<char* const*>(argv));
    ::_exit(127);
  }
  ::close(status[1]);
  ::close(control[0]);
  child c;
  c.pid = pid;
  c.control = control[1];
  pollfd p{status[0], POLLIN, 0};
  if (::poll(&p, 1, 10000) != 1 || ::read(status[0], &c.port, sizeof c.port) != sizeof c.port) {
    std::fprintf(stderr, "the server did not start\n");
    std::exit(1);
  }
  ::close(status[0]);
  return c;
}

request make_request(uint64_t id, uint32_t rows, uint32_t hidden) {
  batch_header h;
  h.batch_id = id;
  h.hidden = hidden;
  h.dtype = wire_dtype::bf16;
  // Up to 8 experts per batch, as a host holding several experts of a layer would receive.
  const uint32_t segments = std::min<uint32_t>(rows, 8);
  for (uint32_t s = 0; s < segments; ++s) h.segments.push_back({s, s, 1, rows / segments + (s < rows % segments)});
  std::mt19937 rng(static_cast<uint32_t>(id));
  std::normal_distribution<float> d;
  std::vector<float> x(size_t{rows} * hidden);
  for (auto& v : x) v = d(rng);
  auto b = make_batch(std::move(h), x);
  request r;
  static_cast<token_batch&>(r) = std::move(*b);
  return r;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

/// One copy of `bytes` between two buffers: hot (the same two buffers each time, in cache up to
/// its size) and cold (rotating through 512 MiB, so every copy reads and writes memory).
std::pair<double, double> memcpy_gbps(size_t bytes) {
  auto run = [bytes](size_t arena) {
    const size_t slots = std::max<size_t>(2, arena / bytes);
    std::vector<char> mem(slots * bytes, 1);
    const int reps = static_cast<int>(std::max<size_t>(20, (size_t{1} << 30) / bytes));
    for (size_t i = 0; i < slots; ++i) std::memset(mem.data() + i * bytes, static_cast<int>(i), bytes);
    const auto t0 = clock_type::now();
    for (int i = 0; i < reps; ++i) {
      const size_t src = static_cast<size_t>(i) % slots;
      const size_t dst = (static_cast<size_t>(i) + slots / 2) % slots;
      std::memcpy(mem.data() + dst * bytes, mem.data() + src * bytes, bytes);
    }
    const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    return static_cast<double>(bytes) * reps / s / 1e9;
  };
  return {run(2 * bytes), run(size_t{512} << 20)};
}

/// The CPUs the cross-core baseline runs on: the pinned ones, else the first two this process may
/// use; nullopt with fewer than two.
std::optional<std::pair<int, int>> two_cpus(const options& o) {
  if (o.client_cpu >= 0 && o.server_cpu >= 0 && o.client_cpu != o.server_cpu) return std::pair{o.client_cpu, o.server_cpu};
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return std::nullopt;
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  if (cpus.size() < 2) return std::nullopt;
  return std::pair{cpus[0], cpus[1]};
}

/// p50 of a round trip of two cross-core copies of `bytes` (see the file comment): `fresh` copies
/// the buffer the other thread has just written; otherwise each copies from a buffer nobody writes.
/// Runs with this process's own threads pinned to `cpus` (restored afterwards).
double cross_core_rtt_us(size_t bytes, bool fresh, std::pair<int, int> cpus) {
  cpu_set_t saved;
  CPU_ZERO(&saved);
  ::sched_getaffinity(0, sizeof saved, &saved);
  std::vector<char> a(bytes, 1), b(bytes, 2), same_a(bytes, 3), same_b(bytes, 4);
  const int iters = static_cast<int>(std::clamp<size_t>((size_t{1} << 29) / bytes, 200, 20000));
  std::atomic<int> turn{0};
  std::thread peer([&] {
    pin_to(cpus.second);
    for (int i = 0; i < iters; ++i) {
      while (turn.load(std::memory_order_acquire) != 1) {
      }
      std::memcpy(b.data(), fresh ? a.data() : same_b.data(), bytes);
      turn.store(2, std::memory_order_release);
    }
  });
  pin_to(cpus.first);
  std::vector<double> rtt;
  rtt.reserve(static_cast<size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    const auto t0 = clock_type::now();
    turn.store(1, std::memory_order_release);
    while (turn.load(std::memory_order_acquire) != 2) {
    }
    std::memcpy(a.data(), fresh ? b.data() : same_a.data(), bytes);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  peer.join();
  ::sched_setaffinity(0, sizeof saved, &saved);
  const size_t warm = rtt.size() / 10;  // the first round trips fault pages in and fill caches
  return percentile(std::vector<double>(rtt.begin() + static_cast<std::ptrdiff_t>(warm), rtt.end()), 0.50);
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  if (o.serve) return serve(o);

  child server = spawn_server(o);
  pin_to(o.client_cpu);
  auto rt = make_runtime(o, o.client_spin_us);
  ucx_client_options co;
  co.peer_error_handling = o.peer;
  auto client = ucx_client::make(rt, "127.0.0.1", server.port, co);
  if (!client) {
    std::fprintf(stderr, "%s\n", describe(client.error()).c_str());
    return 1;
  }
  auto& link = **client;
  const char* tls = std::getenv("UCX_TLS");
  std::printf("# UCX_TLS=%s peer_error_handling=%d server_workers=%u spin_us client=%d server=%d awaiting=%d "
              "window=%d ping-pong=%s\n",
              tls ? tls : "(default)", o.peer ? 1 : 0, o.workers, o.client_spin_us, o.server_spin_us,
              o.awaiting_spin_us, o.window, o.sync ? "call_sync" : "call().get()");
  std::printf("%6s %10s %8s %10s %10s %12s %12s %10s %10s %10s %10s\n", "rows", "bytes", "iters", "p50_us", "p99_us",
              "pingpong_GBs", "stream_GBs", "hot_cpy", "cold_cpy", "xc_new_us", "xc_same_us");
  const auto cpus = two_cpus(o);  // for the cross-core baseline
  uint64_t id = 1;
  for (uint32_t rows : o.rows) {
    const size_t bytes = size_t{rows} * o.hidden * 2;
    const int iters = o.iters > 0 ? o.iters : static_cast<int>(std::clamp<size_t>((size_t{2} << 30) / bytes / 4, 200, 20000));
    const int warmup = std::max(20, iters / 10);

    // Ping-pong: the reply's buffer becomes the next request (no allocation on the client's side).
    request req = make_request(id, rows, o.hidden);
    std::vector<double> rtt;
    rtt.reserve(static_cast<size_t>(iters));
    uint64_t allocs0 = 0;
    for (int i = 0; i < warmup + iters; ++i) {
      if (i == warmup) allocs0 = g_allocs.load();
      req.header.batch_id = id++;
      const auto t0 = clock_type::now();
      std::optional<caf::expected<reply>> rep;  // no placeholder error: the loop allocates only what the link does
      if (o.sync) {
        rep.emplace(link.call_sync(std::move(req), std::chrono::seconds(10)));
      } else {
        auto fut = link.call(std::move(req), std::chrono::seconds(10));
        if (o.caller_spin_us > 0) {
          // Poll the future for a while before sleeping on it: saves the wake-up on fast replies.
          const auto until = t0 + std::chrono::microseconds(o.caller_spin_us);
          while (fut.wait_for(std::chrono::seconds(0)) != std::future_status::ready && clock_type::now() < until) {
          }
        }
        rep.emplace(fut.get());
      }
      const auto t1 = clock_type::now();
      if (!*rep) {
        std::fprintf(stderr, "round trip failed: %s\n", describe(rep->error()).c_str());
        return 1;
      }
      if (i >= warmup) rtt.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      static_cast<token_batch&>(req) = std::move(**rep);
    }
    const double allocs_per_rtt = static_cast<double>(g_allocs.load() - allocs0) / iters;
    const double p50 = percentile(rtt, 0.50);
    const double p99 = percentile(rtt, 0.99);
    const double pingpong = 2.0 * static_cast<double>(bytes) / (p50 * 1e-6) / 1e9;

    // Stream: `window` requests in flight; each completion sends the next.
    std::mutex mu;
    std::condition_variable cv;
    int done = 0;
    int failed = 0;
    const int total = iters;
    std::atomic<int> issued{0};
    // At most `window` batches and 8 MiB in flight: a router's step sends one batch per host, and
    // a whole step of a 512-token prefill is 4 MiB of rows.
    const int window = static_cast<int>(std::clamp<size_t>((size_t{8} << 20) / bytes, 1, static_cast<size_t>(o.window)));
    std::vector<request> pool;
    for (int w = 0; w < window; ++w) pool.push_back(make_request(id + static_cast<uint64_t>(w), rows, o.hidden));
    std::function<void(request)> issue;
    issue = [&](request r) {
      const int n = issued.fetch_add(1);
      if (n >= total) return;
      r.header.batch_id = id + static_cast<uint64_t>(n);
      link.send(std::move(r), std::chrono::seconds(10), [&](caf::expected<reply> rep) {
        std::unique_lock lock(mu);
        ++done;
        if (!rep) {
          ++failed;
          if (failed == 1) std::fprintf(stderr, "stream: %s\n", describe(rep.error()).c_str());
        } else {
          request next;
          static_cast<token_batch&>(next) = std::move(*rep);
          lock.unlock();
          issue(std::move(next));
          lock.lock();
        }
        cv.notify_all();
      });
    };
    const auto s0 = clock_type::now();
    if (!o.stream) {
      pool.clear();
      done = total;
    }
    for (auto& r : pool) issue(std::move(r));
    {
      std::unique_lock lock(mu);
      // A failed request ends its chain (its buffer is gone): stop once all chains ended.
      cv.wait(lock, [&] { return done >= total || failed >= window; });
    }
    const double secs = std::chrono::duration<double>(clock_type::now() - s0).count();
    id += static_cast<uint64_t>(total);
    if (failed > 0) {
      std::fprintf(stderr, "%d streamed requests failed\n", failed);
      return 1;
    }
    const double stream = static_cast<double>(bytes) * total / secs / 1e9;
    const auto [hot, cold] = memcpy_gbps(bytes);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double xc_new = cpus ? cross_core_rtt_us(bytes, true, *cpus) : nan;
    const double xc_same = cpus ? cross_core_rtt_us(bytes, false, *cpus) : nan;
    std::printf("%6u %10zu %8d %10.1f %10.1f %12.3f %12.3f %10.2f %10.2f %10.2f %10.2f\n", rows, bytes, iters, p50, p99,
                pingpong, stream, hot, cold, xc_new, xc_same);
    std::printf("RESULT rows=%u bytes=%zu p50_us=%.2f p99_us=%.2f pingpong_gbps=%.4f stream_gbps=%.4f "
                "memcpy_hot_gbps=%.3f memcpy_cold_gbps=%.3f client_allocs_per_rtt=%.2f xcore_new_us=%.3f "
                "xcore_same_us=%.3f\n",
                rows, bytes, p50, p99, pingpong, stream, hot, cold, allocs_per_rtt, xc_new, xc_same);
    std::fflush(stdout);
  }
  client->reset();
  ::close(server.control);
  int status = 0;
  ::waitpid(server.pid, &status, 0);
  return 0;
}
