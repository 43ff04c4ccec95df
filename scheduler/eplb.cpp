#include "scheduler/eplb.hpp"

#include <algorithm>
#include <numeric>

namespace sy::scheduler {
namespace {

size_t z(int i) { return static_cast<size_t>(i); }

/// EPLB's balanced_packing: items in decreasing weight, each to the lightest pack with room.
std::vector<int> balanced_packing(const std::vector<double>& weight, int packs) {
  const int n = static_cast<int>(weight.size());
  const int per_pack = n / packs;
  std::vector<int> order(z(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return weight[z(a)] > weight[z(b)]; });
  std::vector<int> pack(z(n), -1), count(z(packs), 0);
  std::vector<double> w(z(packs), 0.0);
  for (int i : order) {
    int best = -1;
    for (int k = 0; k < packs; ++k)
      if (count[z(k)] < per_pack && (best < 0 || w[z(k)] < w[z(best)])) best = k;
    pack[z(i)] = best;
    ++count[z(best)];
    w[z(best)] += weight[z(i)];
  }
  return pack;
}

/// EPLB's replicate_experts: replica counts for `slots` physical experts.
std::vector<int> replicate(const std::vector<double>& load, int slots) {
  std::vector<int> count(load.size(), 1);
  for (int i = static_cast<int>(load.size()); i < slots; ++i) {
    size_t best = 0;
    for (size_t e = 1; e < load.size(); ++e)
      if (load[e] / count[e] > load[best] / count[best]) best = e;
    ++count[best];
  }
  return count;
}

}  // namespace

plan eplb_plan(const planner_problem& p) {
  const bool hier = p.hierarchical();
  const int nodes = hier ? p.nodes : 1;
  const int groups = hier ? p.groups : 1;
  const int per_group = p.experts / groups;
  const int gpn = p.gpus / nodes;
  const int slots_per_node = p.slots / nodes;
  plan out;
  out.layers.resize(z(p.layers));
  for (int l = 0; l < p.layers; ++l) {
    const auto& load = p.load[z(l)];
    std::vector<double> group_load(z(groups), 0.0);
    for (int e = 0; e < p.experts; ++e) group_load[z(e / per_group)] += load[z(e)];
    const auto group_node = balanced_packing(group_load, nodes);
    auto& layer = out.layers[z(l)];
    layer.assign(z(p.gpus), {});
    for (int n = 0; n < nodes; ++n) {
      std::vector<int> experts;
      for (int e = 0; e < p.experts; ++e)
        if (group_node[z(e / per_group)] == n) experts.push_back(e);
      std::vector<double> node_load;
      for (int e : experts) node_load.push_back(load[z(e)]);
      const auto count = replicate(node_load, slots_per_node);
      std::vector<int> phy_expert;
      std::vector<double> phy_weight;
      for (size_t i = 0; i < experts.size(); ++i)
        for (int k = 0; k < count[i]; ++k) {
          phy_expert.push_back(static_cast<int>(i));
          phy_weight.push_back(node_load[i] / count[i]);
        }
      const auto gpu = balanced_packing(phy_weight, gpn);
      for (size_t r = 0; r < phy_expert.size(); ++r) {
        const size_t i = z(phy_expert[r]);
        auto& dst = layer[z(n * gpn + gpu[r])];
        const double share = 1.0 / count[i];
        auto it = std::find_if(dst.begin(), dst.end(), [&](const placed_replica& x) { return x.expert == experts[i]; });
        if (it != dst.end()) it->share += share;
        else dst.push_back({experts[i], share});
      }
    }
    for (auto& g : layer)
      std::sort(g.begin(), g.end(), [](const placed_replica& a, const placed_replica& b) { return a.expert < b.expert; });
  }
  out.balancedness = balancedness(p, out);
  return out;
}

}  // namespace sy::scheduler
