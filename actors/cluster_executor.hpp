#pragma once
/// The router's expert executor across hosts: for each step it pins one placement epoch, splits a
/// layer's dispatch plan by the replica chosen for each expert (by traffic share), calls each host
/// once, and re-sends the batches of a host that failed or refused to another replica of the same
/// expert (an expert FFN is a pure function, so a retry is safe).
#include "actors/expert_host.hpp"
#include "actors/placement.hpp"

#include <atomic>
#include <functional>
#include <map>
#include <string>
#include <memory>
#include <mutex>
#include <vector>

namespace sy::actors {

class cluster_executor final : public model::expert_executor {
 public:
  /// Opens a channel to a host from its registration (its data address).
  using connector = std::function<std::shared_ptr<expert_channel>(const host_info&)>;
  explicit cluster_executor(connector connect) : connect_(std::move(connect)) {}

  /// A new placement; steps started from now on use it.
  void update(placement_table p, std::vector<host_info> hosts);
  [[nodiscard]] bool ready() const;
  [[nodiscard]] uint64_t epoch() const;
  [[nodiscard]] int hosts_up() const;
  [[nodiscard]] uint64_t retries() const { return retries_; }

  void begin_step() override;
  [[nodiscard]] caf::error run(int layer, const model::dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                               std::vector<std::vector<float>>& outputs) override;

 private:
  struct view {
    placement_table placement;
    std::vector<host_info> hosts;
  };
  connector connect_;
  std::map<std::string, std::shared_ptr<expert_channel>> channels_;  ///< by data address (engine thread only)
  mutable std::mutex mu_;
  std::shared_ptr<const view> latest_;
  std::shared_ptr<const view> step_;  ///< pinned by begin_step (engine thread only)
  std::vector<bool> failed_;          ///< hosts that failed during the current step
  uint64_t rr_ = 0;                   ///< round robin over replicas, weighted by share
  std::atomic<uint64_t> retries_{0};
};

}  // namespace sy::actors
