// `switchyard plan`: the placement planner on a load file, optionally from a previous plan.
#include "apps/cli.hpp"
#include "apps/commands.hpp"
#include "model/error.hpp"
#include "scheduler/planner.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

namespace sy::apps {
namespace {

std::string read_text(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(std::string(what) + " " + path + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

void add_plan_command(CLI::App& app) {
  struct options {
    std::string load, previous, output;
    int64_t max_moves = -1;
    double min_gain = 1e-4;
    double stickiness = 0.5;
  };
  auto opt = std::make_shared<options>();
  auto* cmd = app.add_subcommand("plan", "Plans expert replicas and traffic shares from a load file");
  cmd->add_option("--load", opt->load, "Load JSON: {layers, experts, gpus, nodes, groups, slots, load: [[...] per layer]}")
      ->required();
  cmd->add_option("--previous", opt->previous, "The current placement (a plan JSON): re-plan from it");
  cmd->add_option("--max-moves", opt->max_moves, "At most this many replicas added to GPUs that did not hold them (with --previous)");
  cmd->add_option("--min-gain", opt->min_gain, "Skip moves that gain less (excess over the mean, in mean² units)")
      ->capture_default_str();
  cmd->add_option("--stickiness", opt->stickiness, "How much heavier (× mean GPU load) a GPU already holding an expert may be and still be preferred")
      ->capture_default_str();
  cmd->add_option("--output", opt->output, "Where to write the plan JSON")->required();
  cmd->callback([opt] {
    auto problem = scheduler::problem_from_json(read_text(opt->load, "load file"), opt->load);
    if (!problem) fail(model::describe(problem.error()));
    std::optional<scheduler::plan> previous;
    if (!opt->previous.empty()) {
      auto prev = scheduler::plan_from_json(read_text(opt->previous, "previous plan"), opt->previous);
      if (!prev) fail(model::describe(prev.error()));
      previous = std::move(*prev);
    } else if (opt->max_moves >= 0) {
      fail("--max-moves needs --previous (a plan from scratch moves every replica)");
    }
    scheduler::planner_options po;
    if (opt->max_moves >= 0) po.max_moves = opt->max_moves;
    if (!(opt->min_gain >= 0)) fail("--min-gain must be ≥ 0");
    if (!(opt->stickiness >= 0)) fail("--stickiness must be ≥ 0");
    po.min_gain = opt->min_gain;
    po.stickiness = opt->stickiness;
    const auto t0 = std::chrono::steady_clock::now();
    auto plan = scheduler::plan_placement(*problem, previous ? &*previous : nullptr, po);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!plan) fail(model::describe(plan.error()));
    std::ofstream out(opt->output, std::ios::binary | std::ios::trunc);
    out << scheduler::to_json(*plan) << '\n';
    if (!out.flush()) fail("output " + opt->output + ": cannot be written");
    std::printf("balancedness %.4f", plan->balancedness);
    if (previous)
      std::printf(" (previous plan on this load: %.4f); moves %lld", scheduler::balancedness(*problem, *previous),
                  static_cast<long long>(scheduler::count_moves(*previous, *plan)));
    std::printf("; planned in %.3f s; written to %s\n", secs, opt->output.c_str());
  });
}

}  // namespace sy::apps
