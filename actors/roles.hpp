#pragma once
/// The cluster's processes: coordinator, expert host and router, each an actor system with CAF's
/// network layer (the control plane) and, for hosts and routers, a UCX data plane. They run the
/// same actors as the embedded cluster.
#include "actors/cluster_actors.hpp"
#include "scheduler/batcher.hpp"

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace sy::actors {

struct coordinator_options {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  ///< 0 = any free port
  std::filesystem::path model;
  int hosts = 1;     ///< expert hosts to wait for before placing
  int replicas = 1;  ///< per expert, on distinct hosts
  heartbeat_config heartbeat;
  rebalance_config rebalance;
  std::string state_file;  ///< empty: no persistence
  std::chrono::milliseconds recovery_wait{30000};  ///< after a restart, for the recovered hosts
};

class coordinator_process {
 public:
  static caf::expected<std::unique_ptr<coordinator_process>> start(const coordinator_options& o);
  ~coordinator_process();
  [[nodiscard]] uint16_t port() const;
  void stop();
  struct impl;

 private:
  explicit coordinator_process(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

struct expert_host_options {
  std::string coordinator_host = "127.0.0.1";
  uint16_t coordinator_port = 0;
  std::filesystem::path model;
  int slots = 0;
  std::string listen_host = "127.0.0.1";  ///< data plane (UCX) listen address
  uint16_t listen_port = 0;
  std::string name;
  bool peer_error_handling = true;  ///< UCX peer failure detection (TCP only in UCX 1.13)
  int threads = 0;
  std::shared_ptr<model::device_experts> device;  ///< compute there instead of the CPU (null: CPU)
};

class expert_host_process {
 public:
  static caf::expected<std::unique_ptr<expert_host_process>> start(const expert_host_options& o);
  ~expert_host_process();
  [[nodiscard]] uint16_t data_port() const;
  void stop();
  struct impl;

 private:
  explicit expert_host_process(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

struct router_options {
  std::string coordinator_host = "127.0.0.1";
  uint16_t coordinator_port = 0;
  std::filesystem::path model;
  scheduler::batcher_config batcher;
  bool wire_bf16 = false;  ///< hidden rows as bf16 on the wire (halves the bytes); f32 keeps answers bit-equal to local
  bool peer_error_handling = true;
  std::chrono::milliseconds batch_timeout{5000};
  std::chrono::milliseconds replica_wait{10000};
  std::chrono::milliseconds report_interval{500};  ///< tokens per expert to the coordinator
  int threads = 0;
  /// Micro-batches per step (1 or 2): with 2, one half's attention runs while the other half's
  /// expert batches are on the wire.
  int micro_batches = 2;
  /// Rows each half needs for a step to be split (measured: 8-row decode steps lost 14% split,
  /// 128-row ones gained 4%; docs/benchmarks.md).
  int64_t micro_batch_min_rows = 16;
};

class router_process {
 public:
  static caf::expected<std::unique_ptr<router_process>> start(const router_options& o);
  ~router_process();
  [[nodiscard]] bool ready() const;
  [[nodiscard]] bool wait_ready(std::chrono::milliseconds timeout) const;
  [[nodiscard]] uint64_t epoch() const;
  /// The placement the router uses now, and the hosts it counts as up.
  [[nodiscard]] placement_table placement() const;
  [[nodiscard]] int hosts_up() const;
  [[nodiscard]] std::vector<host_info> hosts() const;
  [[nodiscard]] caf::error submit(scheduler::generation_request r);
  [[nodiscard]] const model::model_config& config() const;
  void drain();
  [[nodiscard]] bool idle() const;
  [[nodiscard]] std::string state_json() const;
  /// Asks the coordinator for a rebalancing round; its JSON summary once it is over.
  [[nodiscard]] caf::expected<std::string> rebalance(std::chrono::milliseconds timeout = std::chrono::minutes(5));
  void stop();
  struct impl;

 private:
  explicit router_process(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace sy::actors
