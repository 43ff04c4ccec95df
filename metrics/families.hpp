#pragma once
/// The catalogue of every metric family Switchyard exports: name, type, help, label names and
/// histogram buckets. The table itself is in families.cpp, the one place a family is defined;
/// everything else (recording, exposition, the series-count tool, the tests that check naming)
/// refers to it through `family`.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace sy::metrics {

/// Every family, in the order of the table (and of the exposition).
enum class family : uint16_t {
  // HTTP front and continuous batcher (router)
  http_requests,
  http_request_duration,
  time_to_first_token,
  time_per_output_token,
  prompt_tokens,
  generated_tokens,
  sequences_finished,
  sequences_running,
  sequences_queued,
  engine_steps,
  // Expert dispatch (router)
  expert_tokens_routed,
  layer_tokens_routed,
  router_placement_epoch,
  router_batch_retries,
  host_round_trip,
  link_sent_bytes,
  link_received_bytes,
  link_errors,
  // Expert hosts
  host_batches,
  host_rows,
  host_batch_duration,
  host_batches_refused,
  host_slots,
  host_slots_used,
  // Coordinator
  placement_epoch,
  hosts_registered,
  hosts_up,
  host_up,
  expert_replicas,
  layer_replicas,
  expert_weight_version,
  layer_weight_version_min,
  layer_weight_version_max,
  rebalance_runs,
  rebalance_moves,
  balancedness,
  layer_balancedness,
  count_  ///< not a family
};

inline constexpr size_t family_count = static_cast<size_t>(family::count_);

enum class family_type : uint8_t { counter, gauge, histogram };

/// Which process role records a family (the embedded cluster records all of them).
enum class family_role : uint8_t { router, expert_host, coordinator };

struct family_def {
  family id;
  std::string_view name;  ///< full name, `switchyard_` prefix, base unit, `_total` for counters
  family_type type;
  std::string_view help;
  std::vector<std::string_view> labels;  ///< label names, from: layer expert host route status reason
  std::vector<double> buckets;           ///< histograms only: upper bounds, ascending (+Inf implied)
  family_role role;
  bool per_expert = false;  ///< one series per (layer, expert): subject to `metrics.per_expert`
};

/// The whole table, indexed by `family`.
[[nodiscard]] std::span<const family_def> catalog();
[[nodiscard]] const family_def& def(family f);

}  // namespace sy::metrics
