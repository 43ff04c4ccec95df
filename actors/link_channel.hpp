#pragma once
/// The data plane between processes: `link_channel` is a router's `expert_channel` over a transport
/// link (one request frame per call, one segment per expert), and `host_request_handler` answers
/// those frames on an expert host from its `expert_host_core`.
#include "actors/expert_host.hpp"
#include "metrics/metrics.hpp"
#include "transport/link.hpp"

#include <atomic>
#include <chrono>
#include <memory>

namespace sy::actors {

class link_channel final : public expert_channel {
 public:
  /// `peer` (the host's name) labels this link's metrics; none are recorded when it is empty.
  link_channel(std::shared_ptr<transport::link_client> link, int64_t hidden, transport::wire_dtype dtype,
               std::chrono::milliseconds timeout, std::string peer = {});
  ~link_channel() override;

  [[nodiscard]] caf::error call(int layer, uint64_t epoch, std::span<const int> experts,
                                std::span<const std::vector<float>* const> inputs,
                                std::span<std::vector<float>* const> outputs) override;
  /// Sends the request and returns; the reply is unpacked into `outputs` on the link's thread.
  [[nodiscard]] std::future<caf::error> call_async(int layer, uint64_t epoch, std::span<const int> experts,
                                                   std::span<const std::vector<float>* const> inputs,
                                                   std::span<std::vector<float>* const> outputs) override;
  /// Closes the link: its pending calls fail with `link_closed`.
  void abandon() override;

 private:
  std::shared_ptr<transport::link_client> link_;
  int64_t hidden_;
  transport::wire_dtype dtype_;
  std::chrono::milliseconds timeout_;
  std::atomic<uint64_t> next_batch_{1};
  std::string peer_;
  std::unique_ptr<metrics::link_watch> watch_;  ///< last: reads link_ until it goes
};

/// Answers token-batch requests from `core`; replies in the request's dtype.
[[nodiscard]] transport::request_handler host_request_handler(std::shared_ptr<expert_host_core> core);

}  // namespace sy::actors
