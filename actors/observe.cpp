#include "actors/observe.hpp"

#include "scheduler/planner.hpp"

#include <algorithm>
#include <limits>

namespace sy::actors {

std::vector<int> moe_layers(const model::model_config& cfg) {
  std::vector<int> out;
  for (int l = 0; l < cfg.num_layers; ++l)
    if (static_cast<size_t>(l) < cfg.moe_layer.size() && cfg.moe_layer[static_cast<size_t>(l)]) out.push_back(l);
  return out;
}

void observe(const coordinator_state& st) {
  metrics::coordinator_view v;
  v.epoch = st.placement.epoch;
  for (const auto& h : st.hosts) v.hosts.emplace_back(h.name, h.up);
  v.layers = moe_layers(st.cfg);
  v.experts = st.cfg.gating.num_experts;
  v.rebalance_runs = st.rebalances;
  v.rebalance_moves = st.moves;
  const size_t experts = static_cast<size_t>(std::max(0, v.experts));
  const size_t n = v.layers.size() * experts;
  v.replicas.assign(n, 0);
  v.versions.assign(n, 0);
  const bool load = st.have_load;
  if (load) v.load.assign(n, 0.0);
  auto up = [&](int h) { return h >= 0 && static_cast<size_t>(h) < st.hosts.size() && st.hosts[static_cast<size_t>(h)].up; };
  double sum_balance = 0;
  for (size_t i = 0; i < v.layers.size(); ++i) {
    const auto l = static_cast<size_t>(v.layers[i]);
    // Expected load per host that is up: each expert's smoothed load split by its replicas' shares.
    std::vector<std::vector<scheduler::placed_replica>> per_host(st.hosts.size());
    for (size_t e = 0; e < experts; ++e) {
      const size_t k = i * experts + e;
      if (load && l < st.smoothed.size() && e < st.smoothed[l].size()) v.load[k] = st.smoothed[l][e];
      if (l >= st.placement.table.size() || e >= st.placement.table[l].size()) continue;
      uint32_t oldest = std::numeric_limits<uint32_t>::max();
      double total = 0;
      for (const auto& r : st.placement.table[l][e])
        if (r.ready && up(r.host)) {
          ++v.replicas[k];
          oldest = std::min(oldest, r.version);
          total += r.share;
        }
      if (v.replicas[k] > 0) v.versions[k] = oldest;
      for (const auto& r : st.placement.table[l][e])
        if (r.ready && up(r.host))
          per_host[static_cast<size_t>(r.host)].push_back(
              {static_cast<int>(e), total > 0 ? r.share / total : 1.0 / static_cast<double>(v.replicas[k])});
    }
    if (load && l < st.smoothed.size()) {
      std::vector<std::vector<scheduler::placed_replica>> hosts_up;
      for (size_t h = 0; h < per_host.size(); ++h)
        if (st.hosts[h].up) hosts_up.push_back(std::move(per_host[h]));
      const double b = hosts_up.empty() ? 0.0 : scheduler::layer_balancedness(st.smoothed[l], hosts_up);
      v.layer_balancedness.push_back(b);
      sum_balance += b;
    }
  }
  if (!v.layer_balancedness.empty()) v.balancedness = sum_balance / static_cast<double>(v.layer_balancedness.size());
  metrics::coordinator(std::move(v));
}

metrics::link_counts link_counts_of(const transport::link_stats& s) {
  metrics::link_counts c;
  c.bytes_sent = s.bytes_sent;
  c.bytes_received = s.bytes_received;
  for (size_t i = 0; i < s.errors.size(); ++i)
    if (s.errors[i] > 0) {
      const auto code = static_cast<transport::wire_errc>(i);
      c.errors.emplace_back(code == transport::wire_errc::none ? "other" : transport::to_string(code), s.errors[i]);
    }
  return c;
}

}  // namespace sy::actors
