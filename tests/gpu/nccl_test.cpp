// pinned_staging round trips, NCCL expert transfer between two GPUs, and the transfer watchdog.
// Catch2's assertions are not thread-safe: the rank threads only record what happened, and the
// test's own thread checks it after joining them.
#include "model/cuda/nccl_mover.hpp"
#include "model/cuda/staging.hpp"

#include <catch2/catch.hpp>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace sy::model;
using namespace sy::model::cuda;
using namespace std::chrono_literals;

namespace {

std::vector<std::byte> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(gen() & 0xffu);
  return out;
}

std::string cuda_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

/// Device buffers of the given sizes on `device` (the calling thread's current device afterwards),
/// freed on destruction. `error` is non-empty when an allocation failed.
struct device_buffers {
  std::vector<void*> ptrs;
  std::vector<size_t> sizes;
  std::string error;

  device_buffers(int device, const std::vector<size_t>& bytes) : sizes(bytes) {
    if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
      error = "cudaSetDevice: " + cuda_text(e);
      return;
    }
    for (size_t n : bytes) {
      void* p = nullptr;
      if (cudaError_t e = cudaMalloc(&p, n); e != cudaSuccess) {
        error = "cudaMalloc: " + cuda_text(e);
        return;
      }
      ptrs.push_back(p);
    }
  }
  device_buffers(const device_buffers&) = delete;
  device_buffers& operator=(const device_buffers&) = delete;
  ~device_buffers() {
    for (void* p : ptrs) (void)cudaFree(p);
  }
  std::vector<const void*> const_ptrs() const { return {ptrs.begin(), ptrs.end()}; }
};

/// The sizes of one expert's matrices: gate [96, 64], up [96, 64], down [64, 96] in bf16 would be
/// equal; these differ (and one is odd) so that a mix-up between buffers shows.
const std::vector<size_t> expert_sizes = {96 * 64 * 2, 128 * 64 * 2 + 6, 64 * 80 * 2 + 1};

}  // namespace

TEST_CASE("pinned_staging: upload then download returns the bytes, also after grow", "[gpu]") {
  const int n = device_count();
  REQUIRE(n >= 0);
  if (n < 1) {
    WARN("needs 1 GPU, found " << n);
    return;
  }
  auto st = pinned_staging::make(0, 1 << 20);
  REQUIRE(st);
  auto& s = **st;
  REQUIRE(s.capacity() == (1u << 20));
  REQUIRE(s.host() != nullptr);
  REQUIRE(s.device() != nullptr);
  CHECK(s.device_id() == 0);

  auto round_trip = [&](size_t bytes, uint32_t seed) {
    const auto pattern = random_bytes(bytes, seed);
    std::memcpy(s.host(), pattern.data(), bytes);
    REQUIRE_FALSE(s.upload(bytes));
    REQUIRE_FALSE(s.wait());
    std::memset(s.host(), 0, s.capacity());
    REQUIRE_FALSE(s.download(bytes));
    REQUIRE_FALSE(s.wait());
    CHECK(std::memcmp(s.host(), pattern.data(), bytes) == 0);
  };
  round_trip(1 << 20, 1);
  round_trip(12345, 2);

  // Too large: refused, nothing enqueued, the staging stays usable.
  auto too_big = s.upload(s.capacity() + 1);
  REQUIRE(too_big);
  CHECK_THAT(describe(too_big), Catch::Contains("exceeds the capacity"));
  CHECK(s.download(s.capacity() + 1));

  // Growing to a smaller size keeps the buffers.
  std::byte* before = s.host();
  REQUIRE_FALSE(s.grow(100));
  CHECK(s.host() == before);
  CHECK(s.capacity() == (1u << 20));

  REQUIRE_FALSE(s.grow((3u << 20) + 7));
  CHECK(s.capacity() == (3u << 20) + 7);
  round_trip((3u << 20) + 7, 3);

  // A staging made empty gets its buffers with the first grow.
  auto empty = pinned_staging::make(0, 0);
  REQUIRE(empty);
  CHECK((*empty)->capacity() == 0);
  CHECK_FALSE((*empty)->upload(0));
  REQUIRE_FALSE((*empty)->grow(4096));
  CHECK((*empty)->capacity() == 4096);
  CHECK((*empty)->host() != nullptr);

  auto bad = pinned_staging::make(n, 16);
  REQUIRE_FALSE(bad);
  CHECK_THAT(describe(bad.error()), Catch::Contains("cudaSetDevice"));
}

TEST_CASE("nccl_mover: an expert's three buffers cross between two GPUs and back", "[gpu]") {
  const int n = device_count();
  if (n < 2) {
    WARN("needs 2 GPUs, found " << n);
    return;
  }
  auto id = nccl_mover::new_unique_id();
  REQUIRE(id);

  std::vector<std::vector<std::byte>> sent;
  for (size_t i = 0; i < expert_sizes.size(); ++i) sent.push_back(random_bytes(expert_sizes[i], 100 + uint32_t(i)));

  struct outcome {
    std::string error;                         ///< the first failure, empty when all went well
    std::vector<std::vector<std::byte>> seen;  ///< what the rank's buffers held at the end
    double make_ms = 0;
    double first_transfer_ms = 0;  ///< includes NCCL connecting to the peer
    double second_transfer_ms = 0;  ///< the other direction: its connection is set up too
    double warm_transfer_ms = 1e9;  ///< the fastest of a few more 0 -> 1 transfers
  };
  auto run_rank = [&](int rank) {
    outcome out;
    const int peer = 1 - rank;
    auto t_make = std::chrono::steady_clock::now();
    auto mover = nccl_mover::make(rank, rank, 2, *id, 20s);
    out.make_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_make).count();
    if (!mover) {
      out.error = "make: " + describe(mover.error());
      return out;
    }
    device_buffers bufs(rank, expert_sizes);
    if (!bufs.error.empty()) {
      out.error = bufs.error;
      return out;
    }
    // Rank 0 starts with the data, rank 1 with zeros.
    for (size_t i = 0; i < bufs.ptrs.size(); ++i) {
      cudaError_t e = rank == 0 ? cudaMemcpy(bufs.ptrs[i], sent[i].data(), sent[i].size(), cudaMemcpyHostToDevice)
                                : cudaMemset(bufs.ptrs[i], 0, bufs.sizes[i]);
      if (e != cudaSuccess) {
        out.error = "fill: " + cuda_text(e);
        return out;
      }
    }
    if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
      out.error = "sync: " + cuda_text(e);
      return out;
    }
    // 0 -> 1, then 1 sends back what it received and 0 receives into its (overwritten) buffers.
    auto t0 = std::chrono::steady_clock::now();
    caf::error err = rank == 0 ? (*mover)->send_expert(peer, bufs.const_ptrs(), bufs.sizes)
                               : (*mover)->recv_expert(peer, bufs.ptrs, bufs.sizes);
    out.first_transfer_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (err) {
      out.error = "first transfer: " + describe(err);
      return out;
    }
    if (rank == 0) {
      for (size_t i = 0; i < bufs.ptrs.size(); ++i) (void)cudaMemset(bufs.ptrs[i], 0, bufs.sizes[i]);
      (void)cudaDeviceSynchronize();
    }
    t0 = std::chrono::steady_clock::now();
    err = rank == 1 ? (*mover)->send_expert(peer, bufs.const_ptrs(), bufs.sizes)
                    : (*mover)->recv_expert(peer, bufs.ptrs, bufs.sizes);
    out.second_transfer_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (err) {
      out.error = "second transfer: " + describe(err);
      return out;
    }
    // Connected both ways: a tight bound is enough now.
    (*mover)->set_timeout(300ms);
    for (int k = 0; k < 5; ++k) {
      t0 = std::chrono::steady_clock::now();
      err = rank == 0 ? (*mover)->send_expert(peer, bufs.const_ptrs(), bufs.sizes)
                      : (*mover)->recv_expert(peer, bufs.ptrs, bufs.sizes);
      out.warm_transfer_ms = std::min(
          out.warm_transfer_ms, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      if (err) {
        out.error = "warm transfer: " + describe(err);
        return out;
      }
    }
    for (size_t i = 0; i < bufs.ptrs.size(); ++i) {
      std::vector<std::byte> host(bufs.sizes[i]);
      if (cudaError_t e = cudaMemcpy(host.data(), bufs.ptrs[i], host.size(), cudaMemcpyDeviceToHost); e != cudaSuccess) {
        out.error = "read back: " + cuda_text(e);
        return out;
      }
      out.seen.push_back(std::move(host));
    }
    return out;  // the mover is destroyed here, in both threads at about the same time
  };

  auto r1 = std::async(std::launch::async, run_rank, 1);
  auto r0 = std::async(std::launch::async, run_rank, 0);
  outcome o0 = r0.get();
  outcome o1 = r1.get();
  INFO("rank 0: " << o0.error);
  INFO("rank 1: " << o1.error);
  REQUIRE(o0.error.empty());
  REQUIRE(o1.error.empty());
  REQUIRE(o0.seen.size() == sent.size());
  REQUIRE(o1.seen.size() == sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    INFO("buffer " << i << ", " << sent[i].size() << " bytes");
    // Compared as one boolean: Catch would print every byte of a mismatch.
    CHECK((o1.seen[i] == sent[i]));  // what rank 1 received from rank 0
    CHECK((o0.seen[i] == sent[i]));  // what rank 0 got back
  }
  WARN("make: rank 0 " << o0.make_ms << " ms, rank 1 " << o1.make_ms
                       << " ms; first transfer (with connection setup): " << o0.first_transfer_ms << " / "
                       << o1.first_transfer_ms << " ms; second: " << o0.second_transfer_ms << " / "
                       << o1.second_transfer_ms << " ms; warm: " << o0.warm_transfer_ms << " / "
                       << o1.warm_transfer_ms << " ms");

  // copy_peer, the baseline, moves the same bytes.
  device_buffers a(0, {sent[0].size()});
  device_buffers b(1, {sent[0].size()});
  REQUIRE(a.error.empty());
  REQUIRE(b.error.empty());
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  REQUIRE(cudaMemcpy(a.ptrs[0], sent[0].data(), sent[0].size(), cudaMemcpyHostToDevice) == cudaSuccess);
  auto peer = enable_peer_access(0, 1);
  if (peer) WARN("no direct peer access: " << describe(peer));
  REQUIRE_FALSE(copy_peer(0, a.ptrs[0], 1, b.ptrs[0], sent[0].size()));
  std::vector<std::byte> back(sent[0].size());
  REQUIRE(cudaSetDevice(1) == cudaSuccess);
  REQUIRE(cudaMemcpy(back.data(), b.ptrs[0], back.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK((back == sent[0]));
}

TEST_CASE("nccl_mover: a receive from a peer that never sends times out, aborts, and stays aborted", "[gpu]") {
  const int n = device_count();
  if (n < 2) {
    WARN("needs 2 GPUs, found " << n);
    return;
  }
  auto id = nccl_mover::new_unique_id();
  REQUIRE(id);

  struct outcome {
    std::string make_error;
    std::string first;   ///< the timed-out receive's error
    std::string second;  ///< a later receive's error
    std::string third;   ///< a later send's error
    bool aborted = false;
    double first_ms = 0;
  };
  std::promise<void> rank0_done;
  auto rank0_finished = rank0_done.get_future();

  // Rank 1 joins the communicator, never sends, and lets go of its mover only after rank 0 has
  // finished: its destructor's finalize then waits for an aborted peer, gives up after its
  // timeout, and aborts (this must not hang either).
  auto r1 = std::async(std::launch::async, [&] {
    outcome out;
    auto made = nccl_mover::make(1, 1, 2, *id, 30s);
    std::unique_ptr<nccl_mover> mover;
    if (made) {
      mover = std::move(*made);
      mover->set_timeout(300ms);
    } else {
      out.make_error = describe(made.error());
    }
    rank0_finished.wait();
    auto t0 = std::chrono::steady_clock::now();
    mover.reset();
    out.first_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return out;
  });
  auto r0 = std::async(std::launch::async, [&] {
    outcome out;
    // Initialisation needs seconds; the transfers get the tight bound.
    auto mover = nccl_mover::make(0, 0, 2, *id, 30s);
    if (!mover) {
      out.make_error = describe(mover.error());
      rank0_done.set_value();
      return out;
    }
    (*mover)->set_timeout(300ms);
    device_buffers bufs(0, expert_sizes);
    if (!bufs.error.empty()) {
      out.make_error = bufs.error;
      rank0_done.set_value();
      return out;
    }
    auto t0 = std::chrono::steady_clock::now();
    auto err = (*mover)->recv_expert(1, bufs.ptrs, bufs.sizes);
    out.first_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    out.first = err ? describe(err) : std::string();
    out.aborted = (*mover)->aborted();
    err = (*mover)->recv_expert(1, bufs.ptrs, bufs.sizes);
    out.second = err ? describe(err) : std::string();
    err = (*mover)->send_expert(1, bufs.const_ptrs(), bufs.sizes);
    out.third = err ? describe(err) : std::string();
    rank0_done.set_value();
    return out;
  });
  outcome o0 = r0.get();
  outcome o1 = r1.get();

  INFO("rank 0 make: " << o0.make_error);
  INFO("rank 1 make: " << o1.make_error);
  REQUIRE(o0.make_error.empty());
  REQUIRE(o1.make_error.empty());
  INFO("rank 0 first error: " << o0.first);
  CHECK(o0.first_ms >= 250);
  CHECK(o0.first_ms < 2000);
  CHECK_THAT(o0.first, Catch::Contains("timeout") && Catch::Contains("peer 1") && Catch::Contains("bytes"));
  CHECK(o0.aborted);
  CHECK_THAT(o0.second, Catch::Contains("aborted"));
  CHECK_THAT(o0.third, Catch::Contains("aborted"));
  // Rank 1's destructor: finalize cannot complete with an aborted peer, so it aborts after ~300 ms.
  CHECK(o1.first_ms < 2000);
  WARN("timed-out receive returned after " << o0.first_ms << " ms; the peer's destructor took " << o1.first_ms
                                          << " ms");
}
