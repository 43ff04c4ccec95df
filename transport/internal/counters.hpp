#pragma once
/// Lock-free counters behind `link_stats`: written by a link's threads, read by anyone.
#include "transport/link.hpp"

#include <atomic>

namespace sy::transport::internal {

struct link_counters {
  std::atomic<uint64_t> requests_sent{0};
  std::atomic<uint64_t> replies_received{0};
  std::atomic<uint64_t> errors_received{0};
  std::atomic<uint64_t> late_replies{0};
  std::atomic<uint64_t> requests_received{0};
  std::atomic<uint64_t> replies_sent{0};
  std::atomic<uint64_t> errors_sent{0};
  std::atomic<uint64_t> bytes_sent{0};
  std::atomic<uint64_t> bytes_received{0};
  std::atomic<uint64_t> links_closed{0};
  std::array<std::atomic<uint64_t>, wire_errc_count> errors{};

  static void bump(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }
  /// Counts `err` under its wire code (other layers' errors under `none`).
  void count_error(const caf::error& err) { bump(errors[static_cast<size_t>(wire_code(err))]); }
  void count_error(wire_errc code) { bump(errors[static_cast<size_t>(code)]); }

  [[nodiscard]] link_stats snapshot() const {
    link_stats s;
    auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    s.requests_sent = ld(requests_sent);
    s.replies_received = ld(replies_received);
    s.errors_received = ld(errors_received);
    s.late_replies = ld(late_replies);
    s.requests_received = ld(requests_received);
    s.replies_sent = ld(replies_sent);
    s.errors_sent = ld(errors_sent);
    s.bytes_sent = ld(bytes_sent);
    s.bytes_received = ld(bytes_received);
    s.links_closed = ld(links_closed);
    for (size_t i = 0; i < errors.size(); ++i) s.errors[i] = ld(errors[i]);
    return s;
  }
};

}  // namespace sy::transport::internal
