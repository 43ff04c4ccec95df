#pragma once
/// The router's expert executor across hosts: for each step it pins one placement epoch, splits
/// each expert's rows over its replicas by their traffic shares (a smooth weighted round robin per
/// row, so the shares hold over time even for one-row batches), calls each host once, and re-sends
/// the rows of a host that failed or refused to another replica of the same expert (an expert FFN
/// is a pure function of each row, so a retry is safe). It counts the tokens each expert receives,
/// which the router reports to the coordinator for rebalancing.
#include "actors/expert_host.hpp"
#include "actors/placement.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <map>
#include <string>
#include <tuple>
#include <memory>
#include <mutex>
#include <vector>

namespace sy::actors {

class cluster_executor final : public model::expert_executor {
 public:
  /// Opens a channel to a host from its registration (its data address).
  using connector = std::function<std::shared_ptr<expert_channel>(const host_info&)>;
  explicit cluster_executor(connector connect) : connect_(std::move(connect)) {}

  /// How long a step whose epoch lost every replica of an expert waits for a newer epoch that
  /// has one (the coordinator re-places lost experts) before the step fails.
  void set_replica_wait(std::chrono::milliseconds w) { replica_wait_ = w; }

  /// The model this router serves: a placement for another shape (layers, experts, which layers
  /// are sparse) is refused by `update`. Unset, every placement is taken.
  void set_shape(int layers, int experts, std::vector<bool> moe_layer);

  /// A new placement; steps started from now on use it. False (and an error logged, the current
  /// placement kept) when it does not fit the shape set above or names a host it does not list:
  /// a coordinator for another model, or a malformed table.
  bool update(placement_table p, std::vector<host_info> hosts);
  [[nodiscard]] bool ready() const;
  [[nodiscard]] uint64_t epoch() const;
  /// The newest placement received.
  [[nodiscard]] placement_table placement() const;
  /// The cluster as this router sees it, as JSON: {"epoch", "hosts": [{"id", "name", "address",
  /// "slots", "up", "replicas"}], "layers": [{"layer", "experts": [[{"host", "share", "version",
  /// "ready"}] per expert]}]} (sparse layers only).
  [[nodiscard]] std::string state_json() const;
  [[nodiscard]] int hosts_up() const;
  /// The hosts of the newest placement (with their up/down state).
  [[nodiscard]] std::vector<host_info> hosts() const;
  [[nodiscard]] uint64_t retries() const { return retries_; }

  /// Tokens routed to each (layer, expert) since the last call, [layer][expert]; resets them.
  [[nodiscard]] std::vector<std::vector<double>> take_counts();
  /// True once no step pinned to an epoch older than `epoch` is running: replicas that only
  /// older epochs route to receive nothing more from this router.
  [[nodiscard]] bool drained(uint64_t epoch) const;

  void begin_step() override;
  void end_step() override;
  [[nodiscard]] caf::error run(int layer, const model::dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                               std::vector<std::vector<float>>& outputs) override;
  /// Sends the first round (every batch to its replicas) and returns; `finish` collects the
  /// answers and re-sends what a failed host held.
  [[nodiscard]] std::unique_ptr<ticket> start(int layer, const model::dispatch_plan& plan,
                                              const std::vector<std::vector<float>>& inputs,
                                              std::vector<std::vector<float>>& outputs) override;
  [[nodiscard]] caf::error finish(std::unique_ptr<ticket> t) override;
  /// Whether the channels return before the hosts answer (network links: yes; in-process: no).
  void set_overlaps(bool v) { overlaps_ = v; }
  [[nodiscard]] bool overlaps() const override { return overlaps_; }

 private:
  struct flight;
  /// Assigns every pending piece of `f` to live replicas and sends them (f.calls).
  [[nodiscard]] caf::error send_round(flight& f);
  bool overlaps_ = false;
  struct view {
    placement_table placement;
    std::vector<host_info> hosts;
  };
  connector connect_;
  std::map<std::string, std::shared_ptr<expert_channel>> channels_;  ///< by data address (engine thread only)
  mutable std::mutex mu_;
  std::condition_variable updated_;  ///< notified on every new placement
  std::chrono::milliseconds replica_wait_{10000};
  std::shared_ptr<const view> latest_;
  struct shape {
    int layers = -1, experts = -1;
    std::vector<bool> moe_layer;
  } shape_;  ///< set once, before the first update
  std::shared_ptr<const view> step_;  ///< pinned by begin_step (engine thread only)
  std::vector<bool> failed_;          ///< hosts that failed during the current step
  /// Hosts a call (or the connection for it) failed on, by data address: passed over until
  /// `until` while another live replica can take their rows, so a host that hangs is not waited on
  /// (a batch timeout) or reconnected to (a connect timeout) by every step until the coordinator's
  /// heartbeat marks it down. The wait doubles from kAvoidFirst with each failure up to kAvoidMost
  /// and ends at the host's first answer. Engine thread only.
  struct avoidance {
    std::chrono::steady_clock::time_point until;
    std::chrono::milliseconds wait{0};
  };
  std::map<std::string, avoidance> avoid_;
  std::vector<bool> avoided_;  ///< per host of the pinned epoch: under avoidance when the step began
  void mark_avoided();
  void note_failure(const std::string& address);
  /// Marks `host` failed for the rest of the step and notes the failure, once a step.
  void fail_host(size_t host, const std::string& address);
  /// Whether the newest placement has the host at `address` down (or no longer lists it).
  [[nodiscard]] bool marked_down(const std::string& address) const;
  /// Waits for a call's outcome; if the coordinator marks its host down meanwhile, abandons the
  /// host's channel (its calls fail now, not at the batch timeout) so the rows go elsewhere sooner.
  void await(std::future<caf::error>& result, const std::string& address);
  [[nodiscard]] bool wait_for_replica(int layer, int expert);
  /// Rows sent per (layer, expert, host) under the pinned epoch: the share-following split.
  std::map<std::tuple<int, int, int>, double> sent_;
  uint64_t sent_epoch_ = 0;
  std::atomic<uint64_t> retries_{0};
  std::atomic<uint64_t> step_epoch_{0};
  std::atomic<bool> in_step_{false};
  mutable std::mutex counts_mu_;
  std::vector<std::vector<double>> counts_;
};

}  // namespace sy::actors
