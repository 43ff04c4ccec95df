// Rebalancing at sizes this machine cannot run, through the simulator (scheduler/simulator.hpp)
// with the real planner: a DeepSeek-V3-sized MoE (58 layers × 256 experts, top-8, FP8 experts of
// 7168 × 2048) on H100-class GPUs, under a drifting Zipf load (the hot set moves now and then).
// Per cluster it prints, for a placement never rebalanced, EPLB re-planned from scratch every
// window, and our planner re-planning from the current placement every window (with and without
// a move budget): expert-layer throughput per GPU, the balancedness actually seen, and replica
// moves per hour (a window stands for one minute of traffic).
//   bench_rebalance_sim [--windows N]
#include "model/error.hpp"
#include "scheduler/simulator.hpp"

#include <cstdio>
#include <cstring>
#include <string>

using namespace sy::scheduler;

int main(int argc, char** argv) {
  int windows = 30;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--windows") == 0) windows = std::stoi(argv[i + 1]);
  struct cluster_case {
    const char* name;
    sim_cluster c;
  };
  const cluster_case clusters[] = {
      {"32 GPUs (4 nodes), 288 slots", {32, 4, 288, 3.35e12, 989e12, 50e9}},
      {"144 GPUs (18 nodes), 288 slots", {144, 18, 288, 3.35e12, 989e12, 50e9}},
  };
  sim_model m;  // DeepSeek-V3 defaults
  for (double zipf : {0.8, 1.2}) {
    const auto trace = drifting_trace(windows, m.layers, m.experts, zipf, 0.15, 0.2, 17);
    for (const auto& cc : clusters) {
      std::printf("\n%s, zipf %.1f, %d windows of 1 min, batch 64 tokens/GPU\n", cc.name, zipf, windows);
      std::printf("  %-40s %14s %12s %12s %12s\n", "policy", "tok/s/GPU", "vs static", "balanced", "moves/h");
      double base = 0;
      struct run {
        const char* label;
        sim_options o;
      };
      const run runs[] = {
          {"static (initial placement, never moved)", {sim_policy::static_initial, 1, -1, 0.5, 60}},
          {"EPLB, from scratch every window", {sim_policy::eplb, 1, -1, 0.5, 60}},
          {"ours, from current placement", {sim_policy::planner, 1, -1, 0.5, 60}},
          {"ours, budget 200 moves per window", {sim_policy::planner, 1, 200, 0.5, 60}},
      };
      for (const auto& r : runs) {
        auto res = simulate(cc.c, m, trace, r.o);
        if (!res) {
          std::printf("  %s: %s\n", r.label, sy::model::describe(res.error()).c_str());
          return 1;
        }
        if (base == 0) base = res->tokens_per_s_per_gpu;
        std::printf("  %-40s %14.0f %12.2f %12.3f %12.0f\n", r.label, res->tokens_per_s_per_gpu, res->tokens_per_s_per_gpu / base,
                    res->balancedness, res->moves_per_hour);
      }
    }
  }
  return 0;
}
