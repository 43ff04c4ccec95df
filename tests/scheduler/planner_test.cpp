// The placement planner: constraints on random inputs, determinism, the move budget, degenerate
// loads, errors, and the comparison with EPLB that the benchmark prints at full size.
#include "model/error.hpp"
#include "scheduler/eplb.hpp"
#include "scheduler/loadgen.hpp"
#include "scheduler/planner.hpp"
#include "scheduler/simulator.hpp"

#include <catch2/catch.hpp>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>

using namespace sy::scheduler;
using Catch::Matchers::Contains;
using Catch::Matchers::WithinAbs;

namespace {

planner_problem random_problem(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> pick(0, 5);
  planner_problem p;
  p.layers = 1 + pick(rng) % 3;
  const int nodes_choice[] = {1, 1, 2, 2, 4, 1};
  p.nodes = nodes_choice[pick(rng)];
  p.gpus = p.nodes * (1 + pick(rng) % 4);
  p.groups = p.nodes * (1 + pick(rng) % 2);
  p.experts = p.groups * (2 + pick(rng));
  const int per_gpu_min = (p.experts + p.gpus - 1) / p.gpus;
  const int per_node_experts = p.experts / p.nodes;
  const int per_gpu_max = std::min(per_node_experts, per_gpu_min + 3);
  p.slots = p.gpus * std::uniform_int_distribution<int>(per_gpu_min, std::max(per_gpu_min, per_gpu_max))(rng);
  const double exps[] = {0.0, 0.6, 1.0, 1.4, 2.0, 3.0};
  p.load = zipf_loads({p.layers, p.experts, exps[pick(rng)], 0.3, 1000, rng()});
  return p;
}

}  // namespace

TEST_CASE("planner: every plan on random inputs keeps slot counts, distinct experts, shares summing to 1, groups on one node") {
  std::mt19937_64 rng(123);
  int planned = 0;
  for (int i = 0; i < 300; ++i) {
    auto p = random_problem(rng);
    if (validate(p)) continue;  // an impossible shape (more slots per GPU than a node's experts)
    auto pl = plan_placement(p);
    REQUIRE(pl);
    INFO("layers " << p.layers << " experts " << p.experts << " gpus " << p.gpus << " nodes " << p.nodes << " groups "
                   << p.groups << " slots " << p.slots);
    const auto err = validate(p, *pl);
    INFO(sy::model::describe(err));
    REQUIRE(!err);
    // Every slot is used: all replicas are placed.
    for (const auto& layer : pl->layers) {
      size_t n = 0;
      for (const auto& g : layer) n += g.size();
      CHECK(static_cast<int>(n) == p.slots);
    }
    CHECK(pl->balancedness > 0);
    CHECK(pl->balancedness <= 1 + 1e-12);
    // Re-planning with a drifted load keeps the same guarantees.
    planner_problem q = p;
    q.load = drift(p.load, 0.3, rng());
    auto re = plan_placement(q, &*pl);
    REQUIRE(re);
    REQUIRE(!validate(q, *re));
    ++planned;
  }
  CHECK(planned > 100);
}

TEST_CASE("planner: the same input gives the same plan") {
  planner_problem p{6, 64, 8, 2, 4, 80, zipf_loads({6, 64, 1.1, 0.2, 1e5, 9})};
  auto a = plan_placement(p);
  auto b = plan_placement(p);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(to_json(*a) == to_json(*b));
  planner_problem q = p;
  q.load = drift(p.load, 0.2, 3);
  planner_options o;
  o.max_moves = 10;
  CHECK(to_json(*plan_placement(q, &*a, o)) == to_json(*plan_placement(q, &*a, o)));
}

TEST_CASE("planner: re-planning honours the move budget and moves nothing when nothing changed") {
  planner_problem p{10, 64, 16, 1, 1, 96, zipf_loads({10, 64, 1.2, 0.2, 1e5, 5})};
  auto base = plan_placement(p);
  REQUIRE(base);
  // Same load: the plan is already as good as the planner can make it; nothing should move.
  auto same = plan_placement(p, &*base);
  REQUIRE(same);
  CHECK(count_moves(*base, *same) == 0);
  planner_problem q = p;
  q.load = zipf_loads({10, 64, 1.2, 0.2, 1e5, 6});  // a different hot set: many moves would help
  for (int budget : {0, 1, 5, 20, 100}) {
    planner_options o;
    o.max_moves = budget;
    auto re = plan_placement(q, &*base, o);
    REQUIRE(re);
    INFO("budget " << budget);
    CHECK(count_moves(*base, *re) <= budget);
    REQUIRE(!validate(q, *re));
    CHECK(re->balancedness >= balancedness(q, *base) - 1e-9);  // never worse than leaving it
  }
  // With no budget, re-planning comes close to planning from scratch.
  auto free = plan_placement(q, &*base);
  auto scratch = plan_placement(q);
  CHECK(free->balancedness >= scratch->balancedness - 0.01);
  // Budget 0 still re-optimises the shares, which alone beats keeping the old ones.
  planner_options zero;
  zero.max_moves = 0;
  auto shares_only = plan_placement(q, &*base, zero);
  CHECK(shares_only->balancedness >= balancedness(q, *base) - 1e-12);
}

TEST_CASE("planner: degenerate loads") {
  SECTION("uniform load, slots = experts: one replica each, perfectly balanced") {
    planner_problem p{2, 8, 4, 1, 1, 8, {std::vector<double>(8, 5.0), std::vector<double>(8, 5.0)}};
    auto pl = plan_placement(p);
    REQUIRE(pl);
    CHECK_THAT(pl->balancedness, WithinAbs(1.0, 1e-12));
    for (const auto& g : pl->layers[0]) {
      CHECK(g.size() == 2);
      for (const auto& r : g) CHECK(r.share == 1.0);
    }
  }
  SECTION("one hot expert: replicated onto every GPU, its shares balancing the rest") {
    std::vector<double> l(8, 1.0);
    l[3] = 100;
    planner_problem p{1, 8, 4, 1, 1, 12, {l}};
    auto pl = plan_placement(p);
    REQUIRE(pl);
    int replicas_of_3 = 0;
    for (const auto& g : pl->layers[0])
      for (const auto& r : g) replicas_of_3 += r.expert == 3;
    CHECK(replicas_of_3 == 4);
    CHECK_THAT(pl->balancedness, WithinAbs(1.0, 1e-6));
    // EPLB gives the hot expert the same replicas but splits it evenly.
    CHECK(eplb_plan(p).balancedness < pl->balancedness);
  }
  SECTION("zero load: a valid plan that counts as balanced") {
    planner_problem p{1, 6, 3, 1, 1, 9, {std::vector<double>(6, 0.0)}};
    auto pl = plan_placement(p);
    REQUIRE(pl);
    REQUIRE(!validate(p, *pl));
    CHECK(pl->balancedness == 1.0);
  }
  SECTION("slots per GPU = experts: every GPU holds every expert") {
    planner_problem p{1, 4, 3, 1, 1, 12, {{4, 3, 2, 1}}};
    auto pl = plan_placement(p);
    REQUIRE(pl);
    CHECK_THAT(pl->balancedness, WithinAbs(1.0, 1e-9));
  }
}

TEST_CASE("planner: at least as balanced as EPLB on skewed loads at several sizes") {
  struct sz {
    int layers, experts, gpus, nodes, groups, slots;
  };
  for (const sz& c : {sz{8, 64, 8, 1, 1, 80}, sz{8, 64, 16, 2, 8, 96}, sz{8, 32, 4, 1, 1, 40}, sz{4, 128, 32, 4, 8, 160}})
    for (double ex : {0.6, 1.0, 1.4}) {
      planner_problem p{c.layers, c.experts, c.gpus, c.nodes, c.groups, c.slots,
                        zipf_loads({c.layers, c.experts, ex, 0.2, 1e5, 11})};
      auto ours = plan_placement(p);
      REQUIRE(ours);
      const auto ref = eplb_plan(p);
      INFO("experts " << c.experts << " gpus " << c.gpus << " zipf " << ex);
      CHECK(ours->balancedness >= ref.balancedness - 1e-9);
    }
}

TEST_CASE("planner: invalid input is refused naming the field") {
  auto err_of = [](planner_problem p) { return sy::model::describe(validate(p)); };
  planner_problem ok{1, 8, 4, 1, 1, 8, {std::vector<double>(8, 1.0)}};
  REQUIRE(!validate(ok));
  auto p = ok;
  p.slots = 6;
  CHECK_THAT(err_of(p), Contains("slots (6) must be at least experts (8)"));
  p = ok;
  p.slots = 10;
  CHECK_THAT(err_of(p), Contains("multiple of gpus"));
  p = ok;
  p.load[0][2] = -1;
  CHECK_THAT(err_of(p), Contains("load[0][2]"));
  p = ok;
  p.load.push_back(p.load[0]);
  CHECK_THAT(err_of(p), Contains("load has 2 rows"));
  p = ok;
  p.load[0].pop_back();
  CHECK_THAT(err_of(p), Contains("load[0] has 7 values"));
  p = ok;
  p.slots = 36;
  CHECK_THAT(err_of(p), Contains("exceed experts"));
  p = ok;
  p.nodes = 3;
  CHECK_THAT(err_of(p), Contains("nodes must divide gpus"));
  p = ok;
  p.groups = 3;
  CHECK_THAT(err_of(p), Contains("groups must divide experts"));
  // A previous plan that does not fit the problem.
  auto pl = plan_placement(ok);
  REQUIRE(pl);
  planner_problem bigger{1, 8, 8, 1, 1, 8, {std::vector<double>(8, 1.0)}};
  auto re = plan_placement(bigger, &*pl);
  REQUIRE(!re);
  CHECK_THAT(sy::model::describe(re.error()), Contains("previous plan"));
  // JSON
  CHECK_THAT(sy::model::describe(problem_from_json("{\"layers\":1}", "f.json").error()), Contains("f.json: missing key \"experts\""));
  CHECK_THAT(sy::model::describe(problem_from_json("[1]", "f.json").error()), Contains("not a JSON object"));
  CHECK_THAT(sy::model::describe(
                 problem_from_json(R"({"layers":1,"experts":2,"gpus":1,"slots":2,"load":[[1,"x"]]})", "f.json").error()),
             Contains("load[0][1] must be a number"));
}

TEST_CASE("planner: JSON round trip keeps the plan") {
  planner_problem p{2, 16, 4, 1, 1, 20, zipf_loads({2, 16, 1.0, 0.1, 100, 2})};
  auto pl = plan_placement(p);
  REQUIRE(pl);
  auto back = plan_from_json(to_json(*pl), "plan.json");
  REQUIRE(back);
  CHECK(to_json(*back) == to_json(*pl));
  CHECK(count_moves(*pl, *back) == 0);
}

TEST_CASE("planner: `switchyard plan` writes a valid plan and names the file and field on bad input") {
  const std::string dir = SY_TEST_TMP;
  const std::string load = dir + "/plan_load.json", out = dir + "/plan_out.json", bad = dir + "/plan_bad.json";
  std::ofstream(load) << R"({"layers":2,"experts":8,"gpus":4,"nodes":1,"groups":1,"slots":12,"load":[[9,1,1,1,1,1,1,30],[1,2,3,4,5,6,7,8]]})";
  std::ofstream(bad) << R"({"layers":2,"experts":8,"gpus":4,"slots":12,"load":[[1,1,1,1,1,1,1,-3],[1,2,3,4,5,6,7,8]]})";
  const std::string bin = SY_BINARY;
  REQUIRE(std::system((bin + " plan --load " + load + " --output " + out + " > " + dir + "/plan_stdout.txt").c_str()) == 0);
  std::ifstream in(out);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto pl = plan_from_json(text, out);
  REQUIRE(pl);
  planner_problem p{2, 8, 4, 1, 1, 12, {{9, 1, 1, 1, 1, 1, 1, 30}, {1, 2, 3, 4, 5, 6, 7, 8}}};
  CHECK(!validate(p, *pl));
  CHECK(std::system((bin + " plan --load " + bad + " --output " + out + " 2> " + dir + "/plan_stderr.txt").c_str()) != 0);
  std::ifstream err(dir + "/plan_stderr.txt");
  std::string msg((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
  CHECK_THAT(msg, Contains("plan_bad.json"));
  CHECK_THAT(msg, Contains("load[0][7]"));
}

TEST_CASE("simulator: rebalancing under a skewed, drifting load beats a static placement, EPLB moves more") {
  sim_cluster c{8, 2, 48, 3.35e12, 989e12, 50e9};
  sim_model m;
  m.layers = 4;
  m.experts = 32;
  m.groups = 4;
  m.top_k = 4;
  m.tokens_per_step = 8192;  // compute-bound: imbalance costs time directly
  const auto trace = drifting_trace(6, m.layers, m.experts, 1.2, 0.15, 0.3, 5);
  REQUIRE(trace.size() == 6);
  auto fixed = simulate(c, m, trace, {sim_policy::static_initial, 1, -1, 0.5, 60});
  auto eplb = simulate(c, m, trace, {sim_policy::eplb, 1, -1, 0.5, 60});
  auto ours = simulate(c, m, trace, {sim_policy::planner, 1, -1, 0.5, 60});
  REQUIRE(fixed);
  REQUIRE(eplb);
  REQUIRE(ours);
  CHECK(fixed->moves == 0);
  CHECK(ours->tokens_per_s_per_gpu > fixed->tokens_per_s_per_gpu * 1.1);  // 1.15 measured; the all-to-all is the same for both
  CHECK(ours->balancedness > fixed->balancedness);
  CHECK(ours->moves < eplb->moves);
  CHECK(ours->balancedness >= eplb->balancedness - 0.05);
  // The same trace and policy give the same result.
  auto again = simulate(c, m, trace, {sim_policy::planner, 1, -1, 0.5, 60});
  CHECK(again->moves == ours->moves);
  CHECK(again->tokens_per_s_per_gpu == ours->tokens_per_s_per_gpu);
}
