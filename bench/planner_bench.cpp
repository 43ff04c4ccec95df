// Placement planner against DeepSeek's EPLB (re-implemented in scheduler/eplb.cpp) on synthetic
// Zipf-like loads at the sizes of real deployments. For each case and exponent it prints:
//   balancedness   EPLB's and ours from scratch (target: ours ≥ EPLB's on every case);
//   drift          every load × [0.85, 1.15]: EPLB re-plans from scratch (its moves); ours re-plans
//                  from its previous placement under a budget of 25% of EPLB's moves (target:
//                  within 0.01 of our from-scratch balancedness on the drifted load);
//   time           wall time of our from-scratch plan (target: < 1 s on the largest case).
// Usage: bench_planner [--quick]
#include "model/error.hpp"
#include "scheduler/eplb.hpp"
#include "scheduler/loadgen.hpp"
#include "scheduler/planner.hpp"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

using namespace sy::scheduler;

namespace {

struct bench_case {
  const char* name;
  int layers, experts, gpus, nodes, groups, slots;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bench_case cases[] = {
      {"DeepSeek-V3 58x256, 32 GPUs / 4 nodes, 8 groups, 288 slots", 58, 256, 32, 4, 8, 288},
      {"DeepSeek-V3 58x256, 144 GPUs, 288 slots", 58, 256, 144, 18, 8, 288},
      {"Qwen3-30B-A3B 48x128, 8 GPUs, 144 slots", 48, 128, 8, 1, 1, 144},
      {"Mixtral 32x8, 4 GPUs, 12 slots", 32, 8, 4, 1, 1, 12},
  };
  const double exponents[] = {0.6, 1.0, 1.4};
  std::printf("%-58s %4s | %8s %8s %6s | %6s %8s %8s %6s %9s | %7s %8s\n", "case", "zipf", "EPLB", "ours", "ratio",
              "EPLBmv", "scratch", "replan", "moves", "mv/EPLB", "plan s", "replan s");
  bool all_ok = true;
  double worst_time = 0;
  for (const auto& c : cases) {
    for (double ex : exponents) {
      if (quick && ex != 1.0) continue;
      planner_problem p{c.layers, c.experts, c.gpus, c.nodes, c.groups, c.slots, {}};
      p.load = zipf_loads({c.layers, c.experts, ex, 0.2, 1e6, 42});
      const auto eplb = eplb_plan(p);
      const auto t0 = std::chrono::steady_clock::now();
      auto ours = plan_placement(p);
      const double t = seconds_since(t0);
      worst_time = std::max(worst_time, t);
      if (!ours) {
        std::printf("%s: %s\n", c.name, sy::model::describe(ours.error()).c_str());
        return 1;
      }
      if (auto err = validate(p, *ours)) {
        std::printf("%s: invalid plan: %s\n", c.name, sy::model::describe(err).c_str());
        return 1;
      }
      planner_problem q = p;
      q.load = drift(p.load, 0.15, 7);
      const auto eplb2 = eplb_plan(q);
      const int64_t eplb_moves = count_moves(eplb, eplb2);
      auto scratch = plan_placement(q);
      planner_options opts;
      opts.max_moves = eplb_moves / 4;
      const auto t1 = std::chrono::steady_clock::now();
      auto replan = plan_placement(q, &*ours, opts);
      const double t_re = seconds_since(t1);
      if (!scratch || !replan) {
        std::printf("%s: re-plan failed: %s\n", c.name,
                    sy::model::describe(scratch ? replan.error() : scratch.error()).c_str());
        return 1;
      }
      const int64_t moves = count_moves(*ours, *replan);
      const bool ok = ours->balancedness >= eplb.balancedness - 1e-12 && replan->balancedness >= scratch->balancedness - 0.01 &&
                      moves * 4 <= eplb_moves;
      all_ok = all_ok && ok;
      std::printf("%-58s %4.1f | %8.4f %8.4f %6.3f | %6lld %8.4f %8.4f %6lld %9.3f | %7.3f %8.3f %s\n", c.name, ex, eplb.balancedness,
                  ours->balancedness, ours->balancedness / eplb.balancedness, static_cast<long long>(eplb_moves),
                  scratch->balancedness, replan->balancedness, static_cast<long long>(moves),
                  eplb_moves ? static_cast<double>(moves) / static_cast<double>(eplb_moves) : 0.0, t, t_re, ok ? "" : "MISSED");
    }
  }
  std::printf("slowest from-scratch plan: %.3f s (target < 1 s); all targets %s\n", worst_time, all_ok ? "met" : "NOT met");
  return 0;
}
