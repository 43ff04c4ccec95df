#pragma once
/// The expert placement planner: given a load estimate per (layer, expert), a set of GPUs (expert
/// hosts) with slots, optionally GPUs grouped into nodes and experts into groups, and optionally
/// the current placement, it decides per layer which GPU holds which replicas and what share of
/// an expert's tokens each replica receives.
///
/// Compared with DeepSeek's EPLB (scheduler/eplb.hpp, the reference it is measured against):
///  * traffic shares need not be even: for a fixed set of replicas the shares that minimise the
///    most-loaded GPU are found exactly (a convex problem, solved per layer by water-filling), so
///    replication plus shares balance what replication with even splits cannot;
///  * planning can start from the current placement: per layer it compares the current replicas
///    (shares re-optimised) with a fresh plan packed to keep replicas where they are, adopts fresh
///    plans where they gain most per replica moved, then improves one move at a time — all under
///    a move budget and a minimum gain — so a small change of load costs few moves, not a
///    reshuffle.
///
/// Everything is deterministic: the same input gives the same plan.
#include <caf/expected.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sy::scheduler {

/// What the planner balances. `slots` replicas are spread over `gpus` GPUs (`slots / gpus` each).
struct planner_problem {
  int layers = 0;
  int experts = 0;
  int gpus = 0;
  int nodes = 1;   ///< GPU g is on node g / (gpus / nodes)
  int groups = 1;  ///< expert e is in group e / (experts / groups)
  int slots = 0;   ///< replicas over all GPUs, per layer; a multiple of `gpus`, at least `experts`
  std::vector<std::vector<double>> load;  ///< [layer][expert], ≥ 0 (tokens in a window, smoothed)

  [[nodiscard]] int slots_per_gpu() const { return gpus > 0 ? slots / gpus : 0; }
  /// Groups are kept on one node when there is more than one node and the groups divide evenly.
  [[nodiscard]] bool hierarchical() const { return nodes > 1 && groups > 0 && groups % nodes == 0; }
};

struct placed_replica {
  int expert = 0;
  double share = 1.0;  ///< fraction of the expert's tokens sent here; an expert's shares sum to 1
};

/// [layer][gpu] → the replicas on that GPU (at most slots_per_gpu, distinct experts).
struct plan {
  std::vector<std::vector<std::vector<placed_replica>>> layers;
  double balancedness = 0;  ///< filled by plan_placement (see balancedness())
};

struct planner_options {
  std::optional<int64_t> max_moves;  ///< total over all layers; unset = no budget
  /// A move is made only if it raises the layer's balancedness (mean/max) by at least this much;
  /// keeps the planner from thrashing on noise.
  double min_gain = 1e-4;
  /// Re-planning from a previous plan also packs a fresh plan in which a replica goes to a GPU
  /// that already holds its expert when that GPU is at most this much (× the mean GPU load)
  /// heavier than the lightest choice; larger keeps more replicas where they are.
  double stickiness = 0.5;
};

/// Checks shapes and values; the message names the field at fault.
[[nodiscard]] caf::error validate(const planner_problem& p);
/// Checks that `pl` is a valid placement for `p` (shapes, slot counts, distinct experts per GPU,
/// every expert present, shares in [0, 1] summing to 1, groups on one node when hierarchical).
[[nodiscard]] caf::error validate(const planner_problem& p, const plan& pl);

/// Plans from scratch, or from `previous` (the current placement) when given.
[[nodiscard]] caf::expected<plan> plan_placement(const planner_problem& p, const plan* previous = nullptr,
                                                 const planner_options& opts = {});

/// Mean over layers of (mean GPU load / max GPU load); a GPU's load is the sum over its replicas
/// of expert load × share. A layer with no load counts as 1.
[[nodiscard]] double balancedness(const planner_problem& p, const plan& pl);
/// The same for one layer.
[[nodiscard]] double layer_balancedness(const std::vector<double>& load,
                                        const std::vector<std::vector<placed_replica>>& gpus);
/// Replicas added to a GPU that did not hold that expert before, summed over layers and GPUs.
[[nodiscard]] int64_t count_moves(const plan& before, const plan& after);

/// Sets every replica's share to the value that minimises the layer's most-loaded GPU for the
/// replicas as they are (the traffic part of planning, on its own).
void optimise_shares(const planner_problem& p, plan& pl);

/// JSON in the `switchyard plan` format: problem {"layers","experts","gpus","nodes","groups",
/// "slots","load"}; plan {"placement": [[[{"expert","share"}…] per GPU] per layer], "balancedness"}.
[[nodiscard]] caf::expected<planner_problem> problem_from_json(const std::string& text, const std::string& source);
[[nodiscard]] caf::expected<plan> plan_from_json(const std::string& text, const std::string& source);
[[nodiscard]] std::string to_json(const plan& pl);

}  // namespace sy::scheduler
