#pragma once
/// The placement table: which host holds which (layer, expert) replica, under an epoch that only
/// grows. A router uses one table (one epoch) for a whole step.
#include "model/config.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace sy::actors {

struct replica {
  int host = -1;
  int slot = -1;
  uint32_t version = 1;
  double share = 1.0;  ///< fraction of the expert's tokens sent here; an expert's shares sum to 1
  bool ready = false;
};

struct host_info {
  int id = -1;
  std::string name;
  std::string data_address;  ///< where its data plane listens ("inproc://N" in the embedded cluster)
  int slots = 0;
  bool up = true;
};

struct placement_table {
  uint64_t epoch = 0;
  int layers = 0;
  int experts = 0;
  std::vector<std::vector<std::vector<replica>>> table;  ///< [layer][expert] → replicas; empty for dense layers
  std::vector<bool> moe_layer;

  /// Every expert of every sparse layer has a ready replica on a host that is up.
  [[nodiscard]] bool complete(const std::vector<host_info>& hosts) const;
  /// Every replica in the table is ready (its host has loaded it).
  [[nodiscard]] bool all_ready() const;
  /// (layer, expert) pairs assigned to `host`.
  [[nodiscard]] std::vector<std::pair<int, int>> assigned_to(int host) const;
};

/// Spreads `replicas` replicas of every expert of every sparse layer over distinct hosts, within
/// their slot counts, least-loaded host first. Errors when the hosts cannot hold them.
[[nodiscard]] caf::expected<placement_table> plan_initial(const model::model_config& cfg,
                                                          const std::vector<host_info>& hosts, int replicas);

}  // namespace sy::actors
