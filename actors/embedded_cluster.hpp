#pragma once
/// The embedded cluster: coordinator, one router and N expert hosts as actors in one process, with
/// an in-process data plane — the same actors and the same MoE code as the multi-process cluster.
#include "actors/cluster_actors.hpp"
#include "scheduler/batcher.hpp"

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>

namespace sy::actors {

struct embedded_config {
  std::filesystem::path model;
  int hosts = 4;
  int replicas = 1;
  int slots = 0;  ///< per host; 0 = an even spread plus half as much again (room to rebalance)
  scheduler::batcher_config batcher;
  int threads = 0;  ///< compute threads (0 = all cores)
  /// Makes each expert host's device (null function: the hosts compute on the CPU).
  std::function<caf::expected<std::shared_ptr<model::device_experts>>()> make_device;
  /// How long queued work waits for every expert to have a live replica (at start, or after a
  /// host is lost) before its steps run anyway and fail with the reason.
  std::chrono::milliseconds replica_wait{10000};
  heartbeat_config heartbeat;
  rebalance_config rebalance;
};

class embedded_cluster {
 public:
  /// Loads the model, starts the actors, and begins placing experts; `wait_ready` waits for it.
  static caf::expected<std::unique_ptr<embedded_cluster>> start(const embedded_config& cfg);
  ~embedded_cluster();

  /// Every expert of every sparse layer has a ready replica.
  [[nodiscard]] bool ready() const;
  [[nodiscard]] bool wait_ready(std::chrono::milliseconds timeout) const;
  [[nodiscard]] uint64_t epoch() const;

  /// Queues a generation (refused at once when the queue is full or the cluster shutting down).
  [[nodiscard]] caf::error submit(scheduler::generation_request r);

  [[nodiscard]] const model::model_config& config() const;
  [[nodiscard]] size_t queued() const;
  [[nodiscard]] size_t running() const;

  /// Fault injection for tests: host h fails every batch from now on.
  void kill_host(int h);
  /// Fault injection for tests: host h's actor stops answering (a hang); its data plane still works.
  void freeze_host(int h);
  /// Plans and applies a rebalancing round now; the coordinator's JSON summary when it is over.
  [[nodiscard]] caf::expected<std::string> rebalance(std::chrono::milliseconds timeout = std::chrono::minutes(5));
  /// The cluster as the router sees it (see cluster_executor::state_json).
  [[nodiscard]] std::string state_json() const;
  /// The placement the router uses now.
  [[nodiscard]] placement_table placement() const;
  /// Batches each host has served (tests: who carried the load).
  [[nodiscard]] std::vector<uint64_t> host_batches() const;
  /// Hosts the router's current placement counts as up.
  [[nodiscard]] int hosts_up() const;
  /// The hosts of the router's current placement.
  [[nodiscard]] std::vector<host_info> hosts() const;
  /// Graceful shutdown: refuses new requests, lets the accepted ones finish (see `idle`).
  void drain();
  [[nodiscard]] bool idle() const;
  /// Stops accepting, fails what is queued, finishes the engine thread, stops the actors.
  void shutdown();

  struct impl;

 private:
  explicit embedded_cluster(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace sy::actors
