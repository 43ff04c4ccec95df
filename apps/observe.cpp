#include "apps/observe.hpp"

#include "apps/cli.hpp"
#include "metrics/metrics.hpp"


namespace sy::apps {

void configure_metrics(const std::string& per_expert, bool enabled, const std::string& where) {
  auto mode = metrics::parse_per_expert(per_expert);
  if (!mode) fail(where + ": expected all, off or top:N (N >= 1), got '" + per_expert + "'");
  metrics::configure({enabled, *mode});
}

api::cluster_view cluster_view_of(const actors::placement_table& p, const std::vector<actors::host_info>& hosts) {
  api::cluster_view v;
  v.epoch = p.epoch;
  v.experts = p.experts;
  v.hosts = static_cast<int>(hosts.size());
  for (const auto& h : hosts) v.hosts_up += h.up ? 1 : 0;
  auto up = [&](int h) { return h >= 0 && static_cast<size_t>(h) < hosts.size() && hosts[static_cast<size_t>(h)].up; };
  for (int l = 0; l < p.layers && static_cast<size_t>(l) < p.table.size(); ++l) {
    if (static_cast<size_t>(l) >= p.moe_layer.size() || !p.moe_layer[static_cast<size_t>(l)]) continue;
    const auto& row = p.table[static_cast<size_t>(l)];
    v.layers.push_back(l);
    for (int e = 0; e < p.experts; ++e) {
      int n = 0;
      if (static_cast<size_t>(e) < row.size())
        for (const auto& r : row[static_cast<size_t>(e)]) n += r.ready && up(r.host) ? 1 : 0;
      v.replicas.push_back(n);
    }
  }
  return v;
}

}  // namespace sy::apps
