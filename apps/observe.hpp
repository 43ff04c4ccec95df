#pragma once
/// Metrics settings and the dashboard's view of the cluster, shared by `serve` and the cluster's
/// processes.
#include "actors/placement.hpp"
#include "api/dashboard.hpp"

#include <string>
#include <vector>

namespace sy::apps {

/// Applies `metrics.per_expert` ("all", "off" or "top:N") and metrics on/off; a bad mode fails
/// naming `where` (a flag, or FILE: key).
void configure_metrics(const std::string& per_expert, bool enabled, const std::string& where);

/// The router's placement as the dashboard draws it: ready replicas on hosts that are up.
[[nodiscard]] api::cluster_view cluster_view_of(const actors::placement_table& p, const std::vector<actors::host_info>& hosts);

}  // namespace sy::apps
