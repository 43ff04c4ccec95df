#include "actors/placement.hpp"

#include "model/error.hpp"

#include <algorithm>
#include <numeric>

namespace sy::actors {

bool placement_table::complete(const std::vector<host_info>& hosts) const {
  auto up = [&](int h) { return h >= 0 && h < static_cast<int>(hosts.size()) && hosts[static_cast<size_t>(h)].up; };
  for (int l = 0; l < layers; ++l) {
    if (!moe_layer[static_cast<size_t>(l)]) continue;
    for (int e = 0; e < experts; ++e) {
      const auto& rs = table[static_cast<size_t>(l)][static_cast<size_t>(e)];
      if (std::none_of(rs.begin(), rs.end(), [&](const replica& r) { return r.ready && up(r.host); })) return false;
    }
  }
  return true;
}

bool placement_table::all_ready() const {
  for (const auto& layer : table)
    for (const auto& rs : layer)
      for (const auto& r : rs)
        if (!r.ready) return false;
  return true;
}

std::vector<std::pair<int, int>> placement_table::assigned_to(int host) const {
  std::vector<std::pair<int, int>> out;
  for (int l = 0; l < layers; ++l)
    for (int e = 0; e < static_cast<int>(table[static_cast<size_t>(l)].size()); ++e)
      for (const auto& r : table[static_cast<size_t>(l)][static_cast<size_t>(e)])
        if (r.host == host) out.emplace_back(l, e);
  return out;
}

caf::expected<placement_table> plan_initial(const model::model_config& cfg, const std::vector<host_info>& hosts,
                                            int replicas) {
  using model::make_error;
  using model::model_errc;
  const int live = static_cast<int>(std::count_if(hosts.begin(), hosts.end(), [](const host_info& h) { return h.up; }));
  if (replicas < 1) return make_error(model_errc::invalid_argument, "replicas must be at least 1");
  if (replicas > live)
    return make_error(model_errc::invalid_argument, "replicas (" + std::to_string(replicas) + ") exceed the hosts that are up (" +
                                                        std::to_string(live) + "): replicas must sit on distinct hosts");
  placement_table p;
  p.epoch = 1;
  p.layers = cfg.num_layers;
  p.experts = cfg.gating.num_experts;
  p.moe_layer = cfg.moe_layer;
  p.table.resize(static_cast<size_t>(cfg.num_layers));
  std::vector<int> used(hosts.size(), 0);
  int64_t needed = 0, capacity = 0;
  for (auto& h : hosts)
    if (h.up) capacity += h.slots;
  needed = static_cast<int64_t>(cfg.num_moe_layers()) * cfg.gating.num_experts * replicas;
  if (needed > capacity)
    return make_error(model_errc::invalid_argument, "the hosts have " + std::to_string(capacity) + " slots; " +
                                                        std::to_string(needed) + " replicas are needed");
  for (int l = 0; l < cfg.num_layers; ++l) {
    if (!cfg.moe_layer[static_cast<size_t>(l)]) continue;
    auto& row = p.table[static_cast<size_t>(l)];
    row.resize(static_cast<size_t>(cfg.gating.num_experts));
    for (int e = 0; e < cfg.gating.num_experts; ++e) {
      std::vector<int> order(hosts.size());
      std::iota(order.begin(), order.end(), 0);
      // Least-loaded hosts first; ties by id, so the plan is deterministic.
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return used[static_cast<size_t>(a)] < used[static_cast<size_t>(b)]; });
      for (int h : order) {
        if (static_cast<int>(row[static_cast<size_t>(e)].size()) == replicas) break;
        const auto& hi = hosts[static_cast<size_t>(h)];
        if (!hi.up || used[static_cast<size_t>(h)] >= hi.slots) continue;
        row[static_cast<size_t>(e)].push_back({h, used[static_cast<size_t>(h)]++, 1, 1.0 / replicas, false});
      }
      if (static_cast<int>(row[static_cast<size_t>(e)].size()) < replicas)
        return make_error(model_errc::invalid_argument, "cannot place " + std::to_string(replicas) + " replicas of layer " +
                                                            std::to_string(l) + " expert " + std::to_string(e) +
                                                            " on distinct hosts with free slots");
    }
  }
  return p;
}

}  // namespace sy::actors
