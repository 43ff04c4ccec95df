#pragma once
/// What the actors layer tells the metrics layer: conversions from its own types (the
/// coordinator's state, a model's layout, a link's counters) to the plain structs of
/// metrics/metrics.hpp, so the hooks in the actors and the cores stay one line each.
#include "actors/cluster_actors.hpp"
#include "metrics/metrics.hpp"
#include "transport/link.hpp"

namespace sy::actors {

/// The coordinator's state as metrics (placement epoch, hosts, replicas and versions per expert,
/// balancedness under the smoothed load, rebalance counts). Cost O(layers × experts × replicas).
void observe(const coordinator_state& st);

/// The MoE layers of a model, for `metrics::expert_layout`.
[[nodiscard]] std::vector<int> moe_layers(const model::model_config& cfg);

/// A link's counters for `metrics::link_watch`; errors by the transport's reason names ("other"
/// for errors of other layers).
[[nodiscard]] metrics::link_counts link_counts_of(const transport::link_stats& s);

}  // namespace sy::actors
