#include "scheduler/planner.hpp"

#include "model/error.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <cmath>
#include <numeric>
#include <queue>
#include <set>
#include <tuple>

namespace sy::scheduler {
namespace {

using model::make_error;
using model::model_errc;

caf::error bad(const std::string& msg) { return make_error(model_errc::bad_value, msg); }

// ---------------------------------------------------------------------------------------------
// One layer restricted to one node (the whole layer when not hierarchical): local experts and
// GPUs, and the replicas with the tokens each receives (its flow; share = flow / load).

struct part {
  std::vector<int> expert_ids;  ///< local → global expert
  int gpu0 = 0;                 ///< global id of local GPU 0
  int gpus = 0;
  int cap = 0;  ///< slots per GPU
  std::vector<double> load;     ///< per local expert
  double mean = 0;              ///< mean GPU load of the whole layer
};

struct state {
  std::vector<std::vector<int>> on;       ///< [gpu] → local experts
  std::vector<std::vector<int>> holders;  ///< [expert] → gpus
  std::vector<std::vector<double>> flow;  ///< [expert] → tokens per holder (parallel to holders)
  std::vector<double> gpu_load;

  [[nodiscard]] bool holds(int g, int e) const {
    const auto& h = holders[static_cast<size_t>(e)];
    return std::find(h.begin(), h.end(), g) != h.end();
  }
  [[nodiscard]] int argmax() const {
    return static_cast<int>(std::max_element(gpu_load.begin(), gpu_load.end()) - gpu_load.begin());
  }
  [[nodiscard]] double max_load() const { return *std::max_element(gpu_load.begin(), gpu_load.end()); }
};

size_t z(int i) { return static_cast<size_t>(i); }

/// How far a part's GPUs sit above the layer's mean: Σ (load − mean)² over GPUs above it, in
/// units of mean². Zero when balanced; unlike the maximum it also falls when one of several
/// equally loaded GPUs is relieved, so the search does not stall on a plateau.
double excess(const std::vector<double>& gpu_load, double mean) {
  if (mean <= 0) return 0;
  double q = 0;
  for (double l : gpu_load)
    if (l > mean) q += (l - mean) * (l - mean);
  return q / (mean * mean);
}

/// Adds a replica of e on g with no tokens yet.
void add_replica(state& s, int e, int g) {
  s.on[z(g)].push_back(e);
  s.holders[z(e)].push_back(g);
  s.flow[z(e)].push_back(0.0);
}

/// Removes e's replica on g; its tokens go to e's other replicas evenly (rebalanced later).
void remove_replica(state& s, int e, int g) {
  auto& on = s.on[z(g)];
  on.erase(std::find(on.begin(), on.end(), e));
  auto& hs = s.holders[z(e)];
  auto& fl = s.flow[z(e)];
  const size_t i = static_cast<size_t>(std::find(hs.begin(), hs.end(), g) - hs.begin());
  const double moved = fl[i];
  s.gpu_load[z(g)] -= moved;
  hs.erase(hs.begin() + static_cast<std::ptrdiff_t>(i));
  fl.erase(fl.begin() + static_cast<std::ptrdiff_t>(i));
  for (size_t k = 0; k < hs.size(); ++k) {
    fl[k] += moved / static_cast<double>(hs.size());
    s.gpu_load[z(hs[k])] += moved / static_cast<double>(hs.size());
  }
}

/// Splits e's tokens over its replicas so that their GPUs end as level as possible given the rest
/// of their load (water-filling): the exact minimiser of the sum of squared GPU loads over e's
/// shares with everything else fixed.
void refill(state& s, const part& pt, int e) {
  auto& hs = s.holders[z(e)];
  auto& fl = s.flow[z(e)];
  const double total = pt.load[z(e)];
  const size_t r = hs.size();
  if (r == 1) {
    s.gpu_load[z(hs[0])] += total - fl[0];
    fl[0] = total;
    return;
  }
  // Small r (a few replicas): insertion sort of the other loads.
  std::array<std::pair<double, size_t>, 64> buf{};
  std::vector<std::pair<double, size_t>> big;
  std::pair<double, size_t>* o = buf.data();
  if (r > buf.size()) {
    big.resize(r);
    o = big.data();
  }
  for (size_t i = 0; i < r; ++i) o[i] = {s.gpu_load[z(hs[i])] - fl[i], i};
  std::sort(o, o + r);
  double sum = 0, level = 0;
  for (size_t k = 1; k <= r; ++k) {
    sum += o[k - 1].first;
    level = (total + sum) / static_cast<double>(k);
    if (k == r || level <= o[k].first) break;
  }
  for (size_t i = 0; i < r; ++i) {
    const double others = s.gpu_load[z(hs[i])] - fl[i];
    const double x = std::max(0.0, level - others);
    s.gpu_load[z(hs[i])] = others + x;
    fl[i] = x;
  }
}

/// Block coordinate descent on the squared GPU loads over all replicated experts; its fixed point
/// is the lexicographically most balanced split, which also minimises the most-loaded GPU.
void balance(state& s, const part& pt, int max_sweeps, double tol) {
  std::vector<int> replicated;
  for (int e = 0; e < static_cast<int>(s.holders.size()); ++e) {
    if (s.holders[z(e)].size() > 1) replicated.push_back(e);
    else refill(s, pt, e);  // a lone replica takes all (it may have just moved)
  }
  if (replicated.empty()) return;
  const double mean = std::accumulate(pt.load.begin(), pt.load.end(), 0.0) / std::max(1, pt.gpus);
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    const double before = s.max_load();
    auto prev = s.gpu_load;
    for (int e : replicated) refill(s, pt, e);
    double change = 0;
    for (size_t g = 0; g < prev.size(); ++g) change = std::max(change, std::abs(prev[g] - s.gpu_load[g]));
    if (change <= tol * std::max(mean, 1e-300) && s.max_load() <= before) break;
  }
}

state empty_state(const part& pt) {
  state s;
  s.on.assign(z(pt.gpus), {});
  s.holders.assign(pt.load.size(), {});
  s.flow.assign(pt.load.size(), {});
  s.gpu_load.assign(z(pt.gpus), 0.0);
  return s;
}

/// Even split (EPLB's assumption) as the starting point; balance() then improves it.
void even_flows(state& s, const part& pt) {
  std::fill(s.gpu_load.begin(), s.gpu_load.end(), 0.0);
  for (size_t e = 0; e < s.holders.size(); ++e) {
    const double each = pt.load[e] / static_cast<double>(s.holders[e].size());
    for (size_t i = 0; i < s.holders[e].size(); ++i) {
      s.flow[e][i] = each;
      s.gpu_load[z(s.holders[e][i])] += each;
    }
  }
}

/// From scratch: replicate the expert with the most tokens per replica until the slots are used
/// (at most one replica per GPU), then place replicas heaviest first on the least-loaded GPU that
/// has a free slot and does not hold that expert yet.
caf::expected<state> initial(const part& pt, const state* prev = nullptr, double slack = 0) {
  const int n = static_cast<int>(pt.load.size());
  std::vector<int> count(z(n), 1);
  int extra = pt.gpus * pt.cap - n;
  using item = std::pair<double, int>;  // (load per replica, -expert) so ties go to the lower id
  std::priority_queue<item> heap;
  for (int e = 0; e < n; ++e) heap.push({pt.load[z(e)], -e});
  while (extra > 0 && !heap.empty()) {
    const int e = -heap.top().second;
    heap.pop();
    if (count[z(e)] >= pt.gpus) continue;
    ++count[z(e)];
    --extra;
    heap.push({pt.load[z(e)] / count[z(e)], -e});
  }
  if (extra > 0) return bad("more slots than distinct (expert, GPU) pairs: every GPU would hold every expert");
  struct rep {
    double weight;
    int expert;
  };
  std::vector<rep> reps;
  for (int e = 0; e < n; ++e)
    for (int k = 0; k < count[z(e)]; ++k) reps.push_back({pt.load[z(e)] / count[z(e)], e});
  std::stable_sort(reps.begin(), reps.end(), [](const rep& a, const rep& b) { return a.weight > b.weight; });
  state s = empty_state(pt);
  std::vector<double> weight(z(pt.gpus), 0.0);
  for (const auto& r : reps) {
    int best = -1;
    for (int g = 0; g < pt.gpus; ++g) {
      if (static_cast<int>(s.on[z(g)].size()) >= pt.cap || s.holds(g, r.expert)) continue;
      if (best < 0 || weight[z(g)] < weight[z(best)]) best = g;
    }
    if (prev && best >= 0 && !prev->holds(best, r.expert)) {
      // Sticky: a GPU that already holds this expert, if it is nearly as light.
      int sticky = -1;
      for (int g : prev->holders[z(r.expert)])
        if (static_cast<int>(s.on[z(g)].size()) < pt.cap && !s.holds(g, r.expert) &&
            weight[z(g)] <= weight[z(best)] + slack * pt.mean && (sticky < 0 || weight[z(g)] < weight[z(sticky)]))
          sticky = g;
      if (sticky >= 0) best = sticky;
    }
    if (best < 0) {
      // Every GPU with a free slot already holds this expert: swap one of its replicas with a
      // replica elsewhere that the free GPU does not hold.
      int free_g = -1;
      for (int g = 0; g < pt.gpus && free_g < 0; ++g)
        if (static_cast<int>(s.on[z(g)].size()) < pt.cap) free_g = g;
      bool done = false;
      for (int h = 0; h < pt.gpus && !done && free_g >= 0; ++h) {
        if (h == free_g || s.holds(h, r.expert)) continue;
        for (int f : s.on[z(h)]) {
          if (s.holds(free_g, f)) continue;
          remove_replica(s, f, h);
          add_replica(s, f, free_g);
          add_replica(s, r.expert, h);
          done = true;
          break;
        }
      }
      if (!done) return bad("cannot place the replicas on distinct GPUs");
      continue;
    }
    add_replica(s, r.expert, best);
    weight[z(best)] += r.weight;
  }
  even_flows(s, pt);
  return s;
}

struct move {
  double gain = 0;  ///< fall of the excess
  int moves = 0;
  int e = -1, from = -1, to = -1, drop = -1;  ///< add e on `to`; drop `drop` from `to`; swap: drop moves to `from`
  bool swap = false;
  /// Then, optionally, swap `x` (on `to`) with the lone replica `y` on GPU `y_gpu`.
  int x = -1, y = -1, y_gpu = -1;
};

void apply(state& s, const move& m) {
  if (m.swap) {
    remove_replica(s, m.e, m.from);
    remove_replica(s, m.drop, m.to);
    add_replica(s, m.e, m.to);
    add_replica(s, m.drop, m.from);
  } else {
    if (m.drop >= 0) remove_replica(s, m.drop, m.to);
    add_replica(s, m.e, m.to);
  }
  if (m.x >= 0) {
    remove_replica(s, m.x, m.to);
    remove_replica(s, m.y, m.y_gpu);
    add_replica(s, m.x, m.y_gpu);
    add_replica(s, m.y, m.to);
  }
}

constexpr int kEvalSweeps = 12;
constexpr int kFinalSweeps = 4000;

/// The best single change (one or two moves) for the part's most-loaded GPU, by fall of the
/// excess per replica moved, that does not raise the part's maximum: give one of that GPU's hot
/// experts a replica on a lightly loaded GPU — in a free slot, in place of a replica that is not
/// the last of its expert (on that GPU or wherever what is left is lightest), or by swapping.
std::optional<move> best_move(const state& s, const part& pt) {
  const int b = s.argmax();
  const double cur_max = s.gpu_load[z(b)];
  const double cur = excess(s.gpu_load, pt.mean);
  if (cur_max <= 0 || cur <= 0) return std::nullopt;
  std::vector<std::pair<double, int>> hot;
  for (int e : s.on[z(b)]) {
    const auto& hs = s.holders[z(e)];
    const size_t i = static_cast<size_t>(std::find(hs.begin(), hs.end(), b) - hs.begin());
    if (s.flow[z(e)][i] > 0) hot.push_back({-s.flow[z(e)][i], e});
  }
  std::sort(hot.begin(), hot.end());
  if (hot.size() > 4) hot.resize(4);
  std::vector<int> light(z(pt.gpus));
  std::iota(light.begin(), light.end(), 0);
  std::stable_sort(light.begin(), light.end(), [&](int a, int c) { return s.gpu_load[z(a)] < s.gpu_load[z(c)]; });

  std::optional<move> best;
  double best_rate = 0;
  auto consider = [&](move m) {
    state t = s;
    apply(t, m);
    balance(t, pt, kEvalSweeps, 0.0);
    if (t.max_load() > cur_max * (1 + 1e-9)) return;
    m.gain = cur - excess(t.gpu_load, pt.mean);
    const double rate = m.gain / m.moves;
    if (rate > best_rate * (1 + 1e-12) + 1e-15) {
      best_rate = rate;
      best = m;
    }
  };
  // The coldest experts with one replica, not on the busiest GPU: partners for re-pairing.
  std::vector<std::pair<double, int>> cold;  // (load, expert) of experts with one replica
  for (int f = 0; f < static_cast<int>(s.holders.size()); ++f)
    if (s.holders[z(f)].size() == 1 && s.holders[z(f)][0] != b && !s.holds(b, f)) cold.push_back({pt.load[z(f)], f});
  const size_t ncold = std::min<size_t>(cold.size(), 8);
  std::partial_sort(cold.begin(), cold.begin() + static_cast<std::ptrdiff_t>(ncold), cold.end());
  for (const auto& [negflow, e] : hot) {
    int tried = 0;
    for (int g : light) {
      if (g == b || s.holds(g, e)) continue;
      if (++tried > 8) break;
      const auto& on = s.on[z(g)];
      if (static_cast<int>(on.size()) < pt.cap) {
        consider({0, 1, e, b, g, -1, false});
        continue;
      }
      // The replica on g carrying the fewest tokens whose expert keeps another replica.
      int drop = -1, swap_with = -1;
      double drop_flow = 0, swap_flow = 0;
      for (int f : on) {
        const auto& hs = s.holders[z(f)];
        const size_t i = static_cast<size_t>(std::find(hs.begin(), hs.end(), g) - hs.begin());
        const double fl = s.flow[z(f)][i];
        if (hs.size() > 1 && (drop < 0 || fl < drop_flow)) drop = f, drop_flow = fl;
        if (!s.holds(b, f) && (swap_with < 0 || fl < swap_flow)) swap_with = f, swap_flow = fl;
      }
      if (drop >= 0) consider({0, 1, e, b, g, drop, false});
      if (swap_with >= 0) consider({0, 2, e, b, g, swap_with, true});
    }
    // Re-count: take a replica from an expert that has more than one and can spare it best (the
    // fewest tokens per remaining replica), on a GPU where it leaves room for e, and give it to e.
    std::vector<std::tuple<double, int, int>> drops;  // (estimated new peak, g, f)
    const double e_after = pt.load[z(e)] / static_cast<double>(s.holders[z(e)].size() + 1);
    for (int f = 0; f < static_cast<int>(s.holders.size()); ++f) {
      const auto& hs = s.holders[z(f)];
      if (f == e || hs.size() < 2) continue;
      const double f_after = pt.load[z(f)] / static_cast<double>(hs.size() - 1);
      for (size_t i = 0; i < hs.size(); ++i)
        if (hs[i] != b && !s.holds(hs[i], e))
          drops.emplace_back(std::max(f_after, s.gpu_load[z(hs[i])] - s.flow[z(f)][i] + e_after), hs[i], f);
    }
    const size_t keep = std::min<size_t>(drops.size(), 6);
    std::partial_sort(drops.begin(), drops.begin() + static_cast<std::ptrdiff_t>(keep), drops.end());
    for (size_t i = 0; i < keep; ++i) {
      const int g = std::get<1>(drops[i]), f = std::get<2>(drops[i]);
      consider({0, 1, e, b, g, f, false});
      // The same, with the heaviest other replica left on g swapped for one of the coldest lone
      // replicas, so that e's new replica does not sit next to a busy expert.
      int x = -1;
      for (int c : s.on[z(g)])
        if (c != f && (x < 0 || pt.load[z(c)] > pt.load[z(x)])) x = c;
      if (x < 0 || s.holders[z(x)].size() != 1) continue;
      for (size_t k = 0; k < ncold && k < 4; ++k) {
        const int y = cold[k].second, yg = s.holders[z(y)][0];
        if (y == e || y == f || y == x || yg == g || yg == b || s.holds(yg, x) || cold[k].first >= pt.load[z(x)]) continue;
        consider({0, 3, e, b, g, f, false, x, y, yg});
        break;
      }
    }
  }
  // Re-pair: swap a replica of the busiest GPU with one of the coldest lone replicas elsewhere,
  // so that hot replicas end up next to cold experts.
  for (int x : s.on[z(b)])
    for (size_t i = 0; i < ncold; ++i) {
      const int f = cold[i].second, g = s.holders[z(f)][0];
      if (!s.holds(g, x) && cold[i].first < pt.load[z(x)]) consider({0, 2, x, b, g, f, true});
    }
  return best;
}

/// One layer: its parts (one per node when hierarchical) and their states.
struct layer_work {
  std::vector<part> parts;
  std::vector<state> states;
  double mean = 0;  ///< over all GPUs of the layer
};

/// The layer's best move: (part, move), the best gain per replica moved over its parts.
std::optional<std::pair<size_t, move>> layer_best(const layer_work& w) {
  std::optional<std::pair<size_t, move>> best;
  for (size_t k = 0; k < w.parts.size(); ++k) {
    auto m = best_move(w.states[k], w.parts[k]);
    if (m && (!best || m->gain / m->moves > best->second.gain / best->second.moves)) best = std::make_pair(k, *m);
  }
  return best;
}

/// Node of each group: packed by group load, the same number of groups per node, heaviest first.
std::vector<int> pack_groups(const planner_problem& p, const std::vector<double>& load) {
  const int per_group = p.experts / p.groups;
  std::vector<double> gl(z(p.groups), 0.0);
  for (int e = 0; e < p.experts; ++e) gl[z(e / per_group)] += load[z(e)];
  std::vector<int> order(z(p.groups));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return gl[z(a)] > gl[z(b)]; });
  std::vector<int> node(z(p.groups), -1), count(z(p.nodes), 0);
  std::vector<double> w(z(p.nodes), 0.0);
  const int cap = p.groups / p.nodes;
  for (int g : order) {
    int best = -1;
    for (int n = 0; n < p.nodes; ++n)
      if (count[z(n)] < cap && (best < 0 || w[z(n)] < w[z(best)])) best = n;
    node[z(g)] = best;
    ++count[z(best)];
    w[z(best)] += gl[z(g)];
  }
  return node;
}

/// Renames the nodes of `fresh` so that as many groups as possible keep the node they have in
/// `current` (greedy on the overlap of node contents).
std::vector<int> relabel(const std::vector<int>& fresh, const std::vector<int>& current, int nodes) {
  std::vector<std::vector<int>> overlap(z(nodes), std::vector<int>(z(nodes), 0));
  for (size_t g = 0; g < fresh.size(); ++g) ++overlap[z(fresh[g])][z(current[g])];
  std::vector<int> to(z(nodes), -1), used(z(nodes), 0);
  for (int round = 0; round < nodes; ++round) {
    int bf = -1, bc = -1, best = -1;
    for (int f = 0; f < nodes; ++f)
      if (to[z(f)] < 0)
        for (int c = 0; c < nodes; ++c)
          if (!used[z(c)] && overlap[z(f)][z(c)] > best) bf = f, bc = c, best = overlap[z(f)][z(c)];
    to[z(bf)] = bc;
    used[z(bc)] = 1;
  }
  std::vector<int> out(fresh.size());
  for (size_t g = 0; g < fresh.size(); ++g) out[g] = to[z(fresh[g])];
  return out;
}

/// The busiest node's load under a group → node assignment.
double node_peak(const planner_problem& p, const std::vector<double>& load, const std::vector<int>& group_node) {
  std::vector<double> node(z(p.nodes), 0.0);
  const int per_group = p.experts / p.groups;
  for (int e = 0; e < p.experts; ++e) node[z(group_node[z(e / per_group)])] += load[z(e)];
  return *std::max_element(node.begin(), node.end());
}

/// Splits a layer into parts: per node (groups as given by `group_node`) or one part.
std::vector<part> make_parts(const planner_problem& p, int layer, const std::vector<int>& group_node) {
  const auto& load = p.load[z(layer)];
  const double mean = std::accumulate(load.begin(), load.end(), 0.0) / p.gpus;
  std::vector<part> parts;
  if (!p.hierarchical()) {
    part pt;
    pt.gpus = p.gpus;
    pt.cap = p.slots_per_gpu();
    pt.expert_ids.resize(z(p.experts));
    std::iota(pt.expert_ids.begin(), pt.expert_ids.end(), 0);
    pt.load = load;
    pt.mean = mean;
    parts.push_back(std::move(pt));
    return parts;
  }
  const int gpn = p.gpus / p.nodes, per_group = p.experts / p.groups;
  parts.resize(z(p.nodes));
  for (int n = 0; n < p.nodes; ++n) {
    parts[z(n)].gpu0 = n * gpn;
    parts[z(n)].gpus = gpn;
    parts[z(n)].cap = p.slots_per_gpu();
    parts[z(n)].mean = mean;
  }
  for (int e = 0; e < p.experts; ++e) {
    auto& pt = parts[z(group_node[z(e / per_group)])];
    pt.expert_ids.push_back(e);
    pt.load.push_back(load[z(e)]);
  }
  return parts;
}

/// The state of a part from a previous plan's layer.
state state_from(const part& pt, const std::vector<std::vector<placed_replica>>& gpus) {
  state s = empty_state(pt);
  std::vector<int> local(1 + static_cast<size_t>(*std::max_element(pt.expert_ids.begin(), pt.expert_ids.end())), -1);
  for (size_t i = 0; i < pt.expert_ids.size(); ++i) local[z(pt.expert_ids[i])] = static_cast<int>(i);
  // Replicas of experts outside this part (groups that moved to another node) are left out.
  for (int g = 0; g < pt.gpus; ++g)
    for (const auto& r : gpus[z(pt.gpu0 + g)])
      if (r.expert >= 0 && z(r.expert) < local.size() && local[z(r.expert)] >= 0) add_replica(s, local[z(r.expert)], g);
  even_flows(s, pt);
  return s;
}

void write_layer(const layer_work& w, std::vector<std::vector<placed_replica>>& out) {
  for (size_t k = 0; k < w.parts.size(); ++k) {
    const auto& pt = w.parts[k];
    const auto& s = w.states[k];
    for (int g = 0; g < pt.gpus; ++g) {
      auto& dst = out[z(pt.gpu0 + g)];
      dst.clear();
      for (int e : s.on[z(g)]) {
        const auto& hs = s.holders[z(e)];
        const size_t i = static_cast<size_t>(std::find(hs.begin(), hs.end(), g) - hs.begin());
        const double l = pt.load[z(e)];
        const double share = l > 0 ? s.flow[z(e)][i] / l : 1.0 / static_cast<double>(hs.size());
        dst.push_back({pt.expert_ids[z(e)], share});
      }
      std::sort(dst.begin(), dst.end(), [](const placed_replica& a, const placed_replica& b) { return a.expert < b.expert; });
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------

caf::error validate(const planner_problem& p) {
  if (p.layers < 1) return bad("layers must be at least 1 (got " + std::to_string(p.layers) + ")");
  if (p.experts < 1) return bad("experts must be at least 1 (got " + std::to_string(p.experts) + ")");
  if (p.gpus < 1) return bad("gpus must be at least 1 (got " + std::to_string(p.gpus) + ")");
  if (p.nodes < 1 || p.gpus % p.nodes != 0)
    return bad("nodes must divide gpus (gpus " + std::to_string(p.gpus) + ", nodes " + std::to_string(p.nodes) + ")");
  if (p.groups < 1 || p.experts % p.groups != 0)
    return bad("groups must divide experts (experts " + std::to_string(p.experts) + ", groups " + std::to_string(p.groups) + ")");
  if (p.slots < p.experts)
    return bad("slots (" + std::to_string(p.slots) + ") must be at least experts (" + std::to_string(p.experts) +
               "): every expert needs a replica");
  if (p.slots % p.gpus != 0)
    return bad("slots (" + std::to_string(p.slots) + ") must be a multiple of gpus (" + std::to_string(p.gpus) + ")");
  const int64_t per_gpu = p.slots / p.gpus;
  if (p.hierarchical()) {
    const int64_t node_experts = p.experts / p.nodes, node_gpus = p.gpus / p.nodes;
    if (per_gpu > node_experts)
      return bad("slots per GPU (" + std::to_string(per_gpu) + ") exceed the experts of a node (" +
                 std::to_string(node_experts) + "): a GPU cannot hold distinct experts in all its slots");
    if (node_experts > per_gpu * node_gpus)
      return bad("a node holds " + std::to_string(node_experts) + " experts but has " + std::to_string(per_gpu * node_gpus) +
                 " slots");
  } else if (per_gpu > p.experts) {
    return bad("slots per GPU (" + std::to_string(per_gpu) + ") exceed experts (" + std::to_string(p.experts) +
               "): a GPU cannot hold distinct experts in all its slots");
  }
  if (static_cast<int>(p.load.size()) != p.layers)
    return bad("load has " + std::to_string(p.load.size()) + " rows; layers is " + std::to_string(p.layers));
  for (size_t l = 0; l < p.load.size(); ++l) {
    if (static_cast<int>(p.load[l].size()) != p.experts)
      return bad("load[" + std::to_string(l) + "] has " + std::to_string(p.load[l].size()) + " values; experts is " +
                 std::to_string(p.experts));
    for (size_t e = 0; e < p.load[l].size(); ++e)
      if (!std::isfinite(p.load[l][e]) || p.load[l][e] < 0)
        return bad("load[" + std::to_string(l) + "][" + std::to_string(e) + "] must be a finite number ≥ 0");
  }
  return {};
}

caf::error validate(const planner_problem& p, const plan& pl) {
  if (static_cast<int>(pl.layers.size()) != p.layers)
    return bad("placement has " + std::to_string(pl.layers.size()) + " layers; the problem has " + std::to_string(p.layers));
  const int per_group = p.experts / std::max(1, p.groups);
  const int gpn = p.gpus / std::max(1, p.nodes);
  for (size_t l = 0; l < pl.layers.size(); ++l) {
    const auto& layer = pl.layers[l];
    const std::string at = "placement[" + std::to_string(l) + "]";
    if (static_cast<int>(layer.size()) != p.gpus)
      return bad(at + " has " + std::to_string(layer.size()) + " GPUs; the problem has " + std::to_string(p.gpus));
    std::vector<double> share(z(p.experts), 0.0);
    std::vector<int> node_of(z(p.experts), -1), group_node(z(p.groups), -1);
    for (size_t g = 0; g < layer.size(); ++g) {
      if (static_cast<int>(layer[g].size()) > p.slots_per_gpu())
        return bad(at + "[" + std::to_string(g) + "] holds " + std::to_string(layer[g].size()) + " replicas; a GPU has " +
                   std::to_string(p.slots_per_gpu()) + " slots");
      std::set<int> seen;
      for (const auto& r : layer[g]) {
        if (r.expert < 0 || r.expert >= p.experts)
          return bad(at + "[" + std::to_string(g) + "]: expert " + std::to_string(r.expert) + " out of range");
        if (!seen.insert(r.expert).second)
          return bad(at + "[" + std::to_string(g) + "]: expert " + std::to_string(r.expert) + " appears twice");
        if (!std::isfinite(r.share) || r.share < -1e-9 || r.share > 1 + 1e-9)
          return bad(at + "[" + std::to_string(g) + "]: share of expert " + std::to_string(r.expert) + " must be in [0, 1]");
        share[z(r.expert)] += r.share;
        if (p.hierarchical()) {
          const int node = static_cast<int>(g) / gpn, grp = r.expert / per_group;
          if (group_node[z(grp)] < 0) group_node[z(grp)] = node;
          if (group_node[z(grp)] != node)
            return bad(at + ": group " + std::to_string(grp) + " has replicas on nodes " + std::to_string(group_node[z(grp)]) +
                       " and " + std::to_string(node) + "; a group's experts must stay on one node");
        }
      }
    }
    for (int e = 0; e < p.experts; ++e)
      if (std::abs(share[z(e)] - 1.0) > 1e-6)
        return bad(at + ": the shares of expert " + std::to_string(e) + " sum to " + std::to_string(share[z(e)]) +
                   " (must be 1; an expert with none has no replica)");
  }
  return {};
}

double layer_balancedness(const std::vector<double>& load, const std::vector<std::vector<placed_replica>>& gpus) {
  std::vector<double> gl(gpus.size(), 0.0);
  for (size_t g = 0; g < gpus.size(); ++g)
    for (const auto& r : gpus[g]) gl[g] += load[z(r.expert)] * r.share;
  const double mx = gl.empty() ? 0 : *std::max_element(gl.begin(), gl.end());
  const double mean = std::accumulate(gl.begin(), gl.end(), 0.0) / std::max<size_t>(1, gl.size());
  return mx > 0 ? mean / mx : 1.0;
}

double balancedness(const planner_problem& p, const plan& pl) {
  double sum = 0;
  for (size_t l = 0; l < pl.layers.size(); ++l) sum += layer_balancedness(p.load[l], pl.layers[l]);
  return pl.layers.empty() ? 1.0 : sum / static_cast<double>(pl.layers.size());
}

int64_t count_moves(const plan& before, const plan& after) {
  int64_t moves = 0;
  for (size_t l = 0; l < after.layers.size(); ++l)
    for (size_t g = 0; g < after.layers[l].size(); ++g)
      for (const auto& r : after.layers[l][g]) {
        bool held = false;
        if (l < before.layers.size() && g < before.layers[l].size())
          for (const auto& q : before.layers[l][g]) held = held || q.expert == r.expert;
        moves += held ? 0 : 1;
      }
  return moves;
}

void optimise_shares(const planner_problem& p, plan& pl) {
  for (int l = 0; l < p.layers; ++l) {
    std::vector<int> group_node(z(std::max(1, p.groups)), 0);
    layer_work w;
    part whole;
    whole.gpus = p.gpus;
    whole.cap = std::max<int>(1, p.slots_per_gpu());
    whole.expert_ids.resize(z(p.experts));
    std::iota(whole.expert_ids.begin(), whole.expert_ids.end(), 0);
    whole.load = p.load[z(l)];
    w.parts.push_back(whole);
    w.states.push_back(state_from(whole, pl.layers[z(l)]));
    balance(w.states[0], w.parts[0], kFinalSweeps, 1e-12);
    write_layer(w, pl.layers[z(l)]);
  }
  pl.balancedness = balancedness(p, pl);
}

caf::expected<plan> plan_placement(const planner_problem& p, const plan* previous, const planner_options& opts) {
  if (auto err = validate(p)) return err;
  if (previous)
    if (auto err = validate(p, *previous)) return make_error(model_errc::bad_value, "previous plan: " + model::describe(err));
  std::vector<layer_work> work(z(p.layers));
  // With a previous plan, each layer also gets a fresh plan packed with a preference for GPUs that
  // already hold the expert (`stickiness`); it is adopted where it gains most per replica moved.
  std::vector<layer_work> fresh(previous ? z(p.layers) : 0);
  std::vector<int64_t> fresh_moves(fresh.size(), 0);
  std::vector<caf::error> errors(z(p.layers));
  auto improve = [&](layer_work& w) {
    for (int step = 0; step < 4 * p.gpus; ++step) {
      auto m = layer_best(w);
      if (!m || m->second.gain < opts.min_gain) break;
      apply(w.states[m->first], m->second);
      balance(w.states[m->first], w.parts[m->first], 200, 1e-9);
    }
  };
#pragma omp parallel for schedule(dynamic)
  for (int l = 0; l < p.layers; ++l) {
    auto& w = work[z(l)];
    std::vector<int> group_node, fresh_group_node;
    if (p.hierarchical()) {
      if (previous) {
        group_node.assign(z(p.groups), 0);
        const int per_group = p.experts / p.groups, gpn = p.gpus / p.nodes;
        for (size_t g = 0; g < previous->layers[z(l)].size(); ++g)
          for (const auto& r : previous->layers[z(l)][g]) group_node[z(r.expert / per_group)] = static_cast<int>(g) / gpn;
        // The fresh plan may also move groups between nodes, where that balances the nodes
        // clearly better (node labels matched to the current ones, so few groups move).
        fresh_group_node = group_node;
        auto regrouped = relabel(pack_groups(p, p.load[z(l)]), group_node, p.nodes);
        if (node_peak(p, p.load[z(l)], regrouped) < node_peak(p, p.load[z(l)], group_node) * 0.99) fresh_group_node = regrouped;
      } else {
        group_node = pack_groups(p, p.load[z(l)]);
      }
    }
    w.parts = make_parts(p, l, group_node);
    w.mean = std::accumulate(p.load[z(l)].begin(), p.load[z(l)].end(), 0.0) / p.gpus;
    if (previous) {
      auto& f = fresh[z(l)];
      f.parts = make_parts(p, l, fresh_group_node);
      f.mean = w.mean;
      for (const auto& pt : f.parts) {
        const auto sticky = state_from(pt, previous->layers[z(l)]);
        auto s = initial(pt, &sticky, opts.stickiness);
        if (!s) {
          errors[z(l)] = s.error();
          break;
        }
        f.states.push_back(std::move(*s));
        balance(f.states.back(), pt, kFinalSweeps, 1e-9);
      }
    }
    for (const auto& pt : w.parts) {
      if (previous) {
        w.states.push_back(state_from(pt, previous->layers[z(l)]));
      } else {
        auto s = initial(pt);
        if (!s) {
          errors[z(l)] = s.error();
          break;
        }
        w.states.push_back(std::move(*s));
      }
      balance(w.states.back(), pt, kFinalSweeps, 1e-9);
    }
    if (errors[z(l)]) continue;
    // No budget applies to a fresh plan's own search: improve while a move gains enough.
    improve(previous ? fresh[z(l)] : w);
    if (previous) {
      std::vector<std::vector<placed_replica>> a(z(p.gpus)), b(z(p.gpus));
      write_layer(w, a);
      write_layer(fresh[z(l)], b);
      plan pa, pb;
      pa.layers.push_back(std::move(a));
      pb.layers.push_back(std::move(b));
      fresh_moves[z(l)] = count_moves(pa, pb);
    }
  }
  for (auto& e : errors)
    if (e) return std::move(e);

  if (previous) {
    int64_t budget = opts.max_moves.value_or(std::numeric_limits<int64_t>::max());
    auto layer_max = [](const layer_work& w) {
      double m = 0;
      for (const auto& st : w.states) m = std::max(m, st.max_load());
      return m;
    };
    auto layer_excess = [](const layer_work& w) {
      double q = 0;
      for (size_t k = 0; k < w.parts.size(); ++k) q += excess(w.states[k].gpu_load, w.parts[k].mean);
      return q;
    };
    // Single moves over all layers: the largest fall of excess per replica moved first, until
    // the budget is spent or no move gains enough.
    auto single_moves = [&](std::vector<layer_work>& ws, int64_t budget_left) {
      using cand = std::pair<double, int>;  // (gain per move, layer)
      std::priority_queue<cand> pq;
      std::vector<std::optional<std::pair<size_t, move>>> best(z(p.layers));
      auto push = [&](int l) {
        const auto& b = best[z(l)];
        if (b && b->second.gain >= opts.min_gain) pq.push({b->second.gain / b->second.moves, l});
      };
#pragma omp parallel for schedule(dynamic)
      for (int l = 0; l < p.layers; ++l) best[z(l)] = layer_best(ws[z(l)]);
      for (int l = 0; l < p.layers; ++l) push(l);
      while (!pq.empty()) {
        const int l = pq.top().second;
        pq.pop();
        auto& b = best[z(l)];
        if (!b) continue;
        if (b->second.moves > budget_left) {
          b.reset();
          continue;
        }
        auto& w = ws[z(l)];
        apply(w.states[b->first], b->second);
        balance(w.states[b->first], w.parts[b->first], 200, 1e-9);
        budget_left -= b->second.moves;
        b = layer_best(w);
        push(l);
      }
    };
    auto score = [&](const std::vector<layer_work>& ws) {
      double sum = 0;
      for (const auto& w : ws) {
        const double m = layer_max(w);
        sum += m > 0 ? w.mean / m : 1.0;
      }
      return sum;
    };
    // Two ways to spend the budget; the better result wins (the first on a tie: fewer moves).
    // (1) single moves from the current replicas;
    std::vector<layer_work> moved = work;
    single_moves(moved, budget);
    // (2) fresh plans first, best gain per move first, while the budget lasts; then single moves.
    std::vector<std::pair<double, int>> adopt;
    for (int l = 0; l < p.layers; ++l) {
      const double gain = layer_excess(work[z(l)]) - layer_excess(fresh[z(l)]);
      if (gain >= opts.min_gain && layer_max(fresh[z(l)]) <= layer_max(work[z(l)]))
        adopt.push_back({fresh_moves[z(l)] > 0 ? gain / static_cast<double>(fresh_moves[z(l)]) : 1e300, l});
    }
    std::stable_sort(adopt.begin(), adopt.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    int64_t left = budget;
    for (const auto& [rate, l] : adopt)
      if (fresh_moves[z(l)] <= left) {
        left -= fresh_moves[z(l)];
        work[z(l)] = std::move(fresh[z(l)]);
      }
    if (!adopt.empty()) single_moves(work, left);
    if (adopt.empty() || score(moved) >= score(work) - 1e-12) work = std::move(moved);
  }

  plan out;
  out.layers.resize(z(p.layers));
#pragma omp parallel for schedule(dynamic)
  for (int l = 0; l < p.layers; ++l) {
    auto& w = work[z(l)];
    for (size_t k = 0; k < w.parts.size(); ++k) balance(w.states[k], w.parts[k], kFinalSweeps, 1e-12);
    out.layers[z(l)].assign(z(p.gpus), {});
    write_layer(w, out.layers[z(l)]);
  }
  out.balancedness = balancedness(p, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// JSON

namespace {

template <class T>
caf::expected<T> get_int(const nlohmann::json& j, const char* key, const std::string& src, std::optional<T> dflt = {}) {
  if (!j.contains(key)) {
    if (dflt) return *dflt;
    return make_error(model_errc::missing_key, src + ": missing key \"" + key + "\"");
  }
  const auto& v = j[key];
  if (!v.is_number_integer())
    return make_error(model_errc::bad_value, src + ": \"" + key + "\" must be an integer");
  const auto x = v.get<int64_t>();
  if (x < 0 || x > 1'000'000) return make_error(model_errc::bad_value, src + ": \"" + key + "\" is out of range");
  return static_cast<T>(x);
}

}  // namespace

caf::expected<planner_problem> problem_from_json(const std::string& text, const std::string& source) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return make_error(model_errc::bad_format, source + ": not a JSON object");
  planner_problem p;
  auto set = [&](int& dst, const char* key, std::optional<int> dflt) -> caf::error {
    auto v = get_int<int>(j, key, source, dflt);
    if (!v) return v.error();
    dst = *v;
    return {};
  };
  if (auto e = set(p.layers, "layers", std::nullopt)) return e;
  if (auto e = set(p.experts, "experts", std::nullopt)) return e;
  if (auto e = set(p.gpus, "gpus", std::nullopt)) return e;
  if (auto e = set(p.nodes, "nodes", 1)) return e;
  if (auto e = set(p.groups, "groups", 1)) return e;
  if (auto e = set(p.slots, "slots", std::nullopt)) return e;
  if (!j.contains("load") || !j["load"].is_array())
    return make_error(model_errc::missing_key, source + ": \"load\" must be an array of layers");
  for (size_t l = 0; l < j["load"].size(); ++l) {
    const auto& row = j["load"][l];
    if (!row.is_array()) return make_error(model_errc::bad_value, source + ": load[" + std::to_string(l) + "] must be an array");
    std::vector<double> r;
    for (size_t e = 0; e < row.size(); ++e) {
      if (!row[e].is_number())
        return make_error(model_errc::bad_value, source + ": load[" + std::to_string(l) + "][" + std::to_string(e) + "] must be a number");
      r.push_back(row[e].get<double>());
    }
    p.load.push_back(std::move(r));
  }
  if (auto err = validate(p)) return make_error(model_errc::bad_value, source + ": " + model::describe(err));
  return p;
}

caf::expected<plan> plan_from_json(const std::string& text, const std::string& source) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return make_error(model_errc::bad_format, source + ": not a JSON object");
  if (!j.contains("placement") || !j["placement"].is_array())
    return make_error(model_errc::missing_key, source + ": \"placement\" must be an array of layers");
  plan pl;
  for (size_t l = 0; l < j["placement"].size(); ++l) {
    const auto& layer = j["placement"][l];
    const std::string at = source + ": placement[" + std::to_string(l) + "]";
    if (!layer.is_array()) return make_error(model_errc::bad_value, at + " must be an array of GPUs");
    std::vector<std::vector<placed_replica>> gpus;
    for (size_t g = 0; g < layer.size(); ++g) {
      if (!layer[g].is_array()) return make_error(model_errc::bad_value, at + "[" + std::to_string(g) + "] must be an array");
      std::vector<placed_replica> reps;
      for (const auto& r : layer[g]) {
        if (!r.is_object() || !r.contains("expert") || !r["expert"].is_number_integer() || !r.contains("share") ||
            !r["share"].is_number())
          return make_error(model_errc::bad_value,
                            at + "[" + std::to_string(g) + "]: each replica must be {\"expert\": int, \"share\": number}");
        reps.push_back({r["expert"].get<int>(), r["share"].get<double>()});
      }
      gpus.push_back(std::move(reps));
    }
    pl.layers.push_back(std::move(gpus));
  }
  if (j.contains("balancedness") && j["balancedness"].is_number()) pl.balancedness = j["balancedness"].get<double>();
  return pl;
}

std::string to_json(const plan& pl) {
  nlohmann::json j;
  auto& layers = j["placement"] = nlohmann::json::array();
  for (const auto& layer : pl.layers) {
    auto gpus = nlohmann::json::array();
    for (const auto& g : layer) {
      auto reps = nlohmann::json::array();
      for (const auto& r : g) reps.push_back({{"expert", r.expert}, {"share", r.share}});
      gpus.push_back(std::move(reps));
    }
    layers.push_back(std::move(gpus));
  }
  j["balancedness"] = pl.balancedness;
  return j.dump();
}

}  // namespace sy::scheduler
