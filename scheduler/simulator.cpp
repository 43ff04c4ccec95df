#include "scheduler/simulator.hpp"

#include "model/error.hpp"
#include "scheduler/eplb.hpp"
#include "scheduler/loadgen.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace sy::scheduler {
namespace {

size_t z(int i) { return static_cast<size_t>(i); }

/// Seconds of one step under `pl` for the load fractions of window `load` ([layer][expert]).
struct step_cost {
  double seconds = 0;
  double balancedness = 0;
};

step_cost cost(const sim_cluster& c, const sim_model& m, const plan& pl, const std::vector<std::vector<double>>& load) {
  const double tokens = static_cast<double>(m.tokens_per_step > 0 ? m.tokens_per_step : int64_t{64} * c.gpus);
  const double w_bytes = 3.0 * static_cast<double>(m.hidden * m.ffn) * m.weight_bytes;
  const double flops_per_token = 2.0 * 3.0 * static_cast<double>(m.hidden * m.ffn);
  const double a2a = 2.0 * tokens * m.top_k * static_cast<double>(m.hidden) * 2.0 / c.gpus / c.link_bytes_per_s;
  step_cost out;
  for (size_t l = 0; l < load.size(); ++l) {
    const double total = std::accumulate(load[l].begin(), load[l].end(), 0.0);
    std::vector<double> gpu_t(z(c.gpus), 0.0), gpu_tokens(z(c.gpus), 0.0);
    for (size_t g = 0; g < pl.layers[l].size(); ++g)
      for (const auto& r : pl.layers[l][g]) {
        const double n = total > 0 ? tokens * m.top_k * load[l][z(r.expert)] / total * r.share : 0.0;
        gpu_tokens[g] += n;
        if (n <= 0) continue;
        gpu_t[g] += std::max(w_bytes / c.hbm_bytes_per_s, n * flops_per_token / c.flops);
      }
    out.seconds += *std::max_element(gpu_t.begin(), gpu_t.end()) + a2a;
    const double mx = *std::max_element(gpu_tokens.begin(), gpu_tokens.end());
    out.balancedness += mx > 0 ? std::accumulate(gpu_tokens.begin(), gpu_tokens.end(), 0.0) / c.gpus / mx : 1.0;
  }
  out.balancedness /= static_cast<double>(load.size());
  return out;
}

}  // namespace

caf::expected<sim_result> simulate(const sim_cluster& c, const sim_model& m,
                                   const std::vector<std::vector<std::vector<double>>>& trace, const sim_options& opt) {
  if (trace.empty()) return model::make_error(model::model_errc::invalid_argument, "the trace has no windows");
  planner_problem p;
  p.layers = m.layers;
  p.experts = m.experts;
  p.gpus = c.gpus;
  p.nodes = c.nodes;
  p.groups = m.groups;
  p.slots = c.slots;
  p.load.assign(z(m.layers), std::vector<double>(z(m.experts), 1.0));  // nothing seen yet: uniform
  if (auto err = validate(p)) return err;
  plan current = eplb_plan(p);
  std::vector<std::vector<double>> estimate;
  sim_result out;
  const double w_bytes = 3.0 * static_cast<double>(m.hidden * m.ffn) * m.weight_bytes;
  const double tokens = static_cast<double>(m.tokens_per_step > 0 ? m.tokens_per_step : int64_t{64} * c.gpus);
  for (size_t w = 0; w < trace.size(); ++w) {
    const auto& load = trace[w];
    if (w > 0 && opt.policy != sim_policy::static_initial && w % static_cast<size_t>(std::max(1, opt.rebalance_every)) == 0) {
      p.load = estimate;
      plan next;
      if (opt.policy == sim_policy::eplb) {
        next = eplb_plan(p);
      } else {
        planner_options po;
        if (opt.max_moves >= 0) po.max_moves = opt.max_moves;
        auto r = plan_placement(p, &current, po);
        if (!r) return r.error();
        next = std::move(*r);
      }
      const int64_t mv = count_moves(current, next);
      out.moves += mv;
      out.move_seconds += static_cast<double>(mv) * w_bytes / c.link_bytes_per_s;
      current = std::move(next);
    }
    const auto sc = cost(c, m, current, load);
    out.tokens_per_s_per_gpu += tokens / sc.seconds / c.gpus;
    out.balancedness += sc.balancedness;
    if (estimate.empty()) {
      estimate = load;
    } else {
      for (size_t l = 0; l < load.size(); ++l)
        for (size_t e = 0; e < load[l].size(); ++e)
          estimate[l][e] = (1 - opt.smoothing) * estimate[l][e] + opt.smoothing * load[l][e];
    }
  }
  const double n = static_cast<double>(trace.size());
  out.tokens_per_s_per_gpu /= n;
  out.balancedness /= n;
  out.moves_per_hour = static_cast<double>(out.moves) / (n * opt.window_seconds / 3600.0);
  return out;
}

std::vector<std::vector<std::vector<double>>> drifting_trace(int windows, int layers, int experts, double zipf, double drift,
                                                             double swap, uint64_t seed) {
  auto base = zipf_loads({layers, experts, zipf, 0.1, 1e6, seed});
  std::mt19937_64 rng(seed ^ 0x5eedull);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::uniform_int_distribution<int> pick(0, experts - 1);
  std::vector<std::vector<std::vector<double>>> out;
  for (int w = 0; w < windows; ++w) {
    for (auto& row : base) {
      if (u(rng) < swap) std::swap(row[z(pick(rng))], row[z(pick(rng))]);
    }
    out.push_back(scheduler::drift(base, drift, rng()));
  }
  return out;
}

}  // namespace sy::scheduler
