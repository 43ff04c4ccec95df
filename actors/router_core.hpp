#pragma once
/// The router's serving half, shared by the embedded cluster and the router process: the dense
/// weights, the cluster executor (experts on the hosts), the decoder, the continuous batcher and its
/// engine thread.
#include "actors/cluster_executor.hpp"
#include "metrics/metrics.hpp"
#include "scheduler/batcher.hpp"

#include <chrono>
#include <memory>
#include <thread>

namespace sy::actors {

class router_core {
 public:
  /// Loads the dense part of the model (no routed experts) and starts the engine thread. Queued
  /// work waits up to `replica_wait` for every expert to have a live replica, then runs and fails
  /// with the reason. `channels_overlap`: the connector's channels return before the host answers
  /// (a network), so a step of at least 2 · `micro_batch_min_rows` rows may run as `micro_batches`
  /// (1 or 2) halves in ping-pong.
  static caf::expected<std::unique_ptr<router_core>> make(std::shared_ptr<const model::model_config> cfg,
                                                          const model::checkpoint& ckpt,
                                                          cluster_executor::connector connect,
                                                          scheduler::batcher_config batcher,
                                                          std::chrono::milliseconds replica_wait,
                                                          bool channels_overlap = false, int micro_batches = 1,
                                                          int64_t micro_batch_min_rows = 1);
  ~router_core();

  [[nodiscard]] const std::shared_ptr<cluster_executor>& executor() const { return exec_; }
  [[nodiscard]] const model::model_config& config() const { return *cfg_; }
  [[nodiscard]] bool ready() const { return exec_->ready(); }
  [[nodiscard]] bool wait_ready(std::chrono::milliseconds timeout) const;
  [[nodiscard]] caf::error submit(scheduler::generation_request r) { return batcher_->submit(std::move(r)); }
  [[nodiscard]] size_t queued() const { return batcher_->queued(); }
  [[nodiscard]] size_t running() const { return batcher_->running(); }
  /// Graceful shutdown: refuses new work; queued and running work goes on. `idle()` says when done.
  void drain() { batcher_->drain(); }
  [[nodiscard]] bool idle() const { return batcher_->idle(); }
  /// Refuses new work, fails what is queued, and joins the engine thread. Idempotent.
  void stop();

 private:
  router_core() = default;
  void run_engine();

  std::shared_ptr<const model::model_config> cfg_;
  std::unique_ptr<model::model_weights> dense_;
  std::shared_ptr<cluster_executor> exec_;
  std::unique_ptr<model::decoder> decoder_;
  std::unique_ptr<scheduler::batcher> batcher_;
  std::chrono::milliseconds replica_wait_{10000};
  std::thread engine_;
  std::unique_ptr<metrics::scrape_hook> metrics_hook_;  ///< last: gone before what it reads
};

}  // namespace sy::actors
