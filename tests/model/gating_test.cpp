#include "model/gating.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace sy::model;

namespace {

float logit(double p) { return static_cast<float>(std::log(p / (1 - p))); }

}  // namespace

TEST_CASE("gating: softmax top-2, renormalised (Mixtral, Qwen3) and not (Qwen2-MoE)", "[gating]") {
  gating_config g;
  g.num_experts = 4;
  g.top_k = 2;
  std::vector<float> logits{std::log(1.0f), std::log(2.0f), std::log(3.0f), std::log(4.0f)};  // softmax .1 .2 .3 .4
  g.norm_topk_prob = false;
  auto r = route_from_logits(g, logits.data(), 1);
  CHECK(r.experts == std::vector<int32_t>{3, 2});
  CHECK(r.weights[0] == Approx(0.4));
  CHECK(r.weights[1] == Approx(0.3));
  g.norm_topk_prob = true;
  r = route_from_logits(g, logits.data(), 1);
  CHECK(r.weights[0] == Approx(4.0 / 7));
  CHECK(r.weights[1] == Approx(3.0 / 7));
}

TEST_CASE("gating: the score bias chooses experts but does not weight them (DeepSeek-V3)", "[gating]") {
  gating_config g;
  g.num_experts = 4;
  g.top_k = 2;
  g.scoring = scoring_func::sigmoid;
  g.method = topk_method::noaux_tc;
  g.norm_topk_prob = true;
  g.routed_scaling_factor = 2.5;
  std::vector<float> logits{logit(0.9), logit(0.8), logit(0.1), logit(0.2)};
  std::vector<float> bias{0, 0, 1.0f, 0};  // choice scores .9 .8 1.1 .2
  auto r = route_from_logits(g, logits.data(), 1, bias.data());
  CHECK(r.experts == std::vector<int32_t>{2, 0});
  // weights from the unbiased scores .1 and .9, renormalised, then scaled
  CHECK(r.weights[0] == Approx(0.1 / 1.0 * 2.5));
  CHECK(r.weights[1] == Approx(0.9 / 1.0 * 2.5));
}

TEST_CASE("gating: group-limited top-k keeps the best groups only", "[gating]") {
  gating_config g;
  g.num_experts = 8;
  g.top_k = 2;
  g.n_group = 4;
  g.topk_group = 2;
  g.scoring = scoring_func::sigmoid;
  //                 group 0          group 1          group 2            group 3
  std::vector<float> logits{logit(0.95), logit(0.05), logit(0.6), logit(0.6), logit(0.55), logit(0.55), logit(0.1), logit(0.1)};
  SECTION("V3: groups ranked by the sum of their two best scores") {
    g.method = topk_method::noaux_tc;
    // sums: g0 1.0, g1 1.2, g2 1.1, g3 0.2 → groups 1 and 2; expert 0 (the best alone) is excluded
    auto r = route_from_logits(g, logits.data(), 1);
    CHECK(r.experts == std::vector<int32_t>{2, 3});
    CHECK(r.weights[0] == Approx(0.6));
  }
  SECTION("V2: groups ranked by their best score") {
    g.method = topk_method::group_limited_greedy;
    // maxima: g0 .95, g1 .6, g2 .55, g3 .1 → groups 0 and 1
    auto r = route_from_logits(g, logits.data(), 1);
    CHECK(r.experts == std::vector<int32_t>{0, 2});
  }
  SECTION("greedy ignores groups") {
    g.method = topk_method::greedy;
    auto r = route_from_logits(g, logits.data(), 1);
    CHECK(r.experts == std::vector<int32_t>{0, 2});
  }
}

TEST_CASE("gating: ties go to the lower expert id, rows are independent", "[gating]") {
  gating_config g;
  g.num_experts = 3;
  g.top_k = 1;
  std::vector<float> logits{1, 1, 0, 0, 0, 5};
  auto r = route_from_logits(g, logits.data(), 2);
  CHECK(r.experts == std::vector<int32_t>{0, 2});
}

TEST_CASE("gating: DeepSeek-V2 renormalises or scales, never both, V3 does both", "[gating]") {
  gating_config g;
  g.num_experts = 4;
  g.top_k = 2;
  g.routed_scaling_factor = 16.0;
  g.norm_eps = 1e-20;
  std::vector<float> logits{std::log(1.0f), std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  g.scale_only_unnormalised = true;  // V2
  g.norm_topk_prob = false;
  auto r = route_from_logits(g, logits.data(), 1);
  CHECK(r.weights[0] == Approx(0.4 * 16));
  g.norm_topk_prob = true;
  r = route_from_logits(g, logits.data(), 1);
  CHECK(r.weights[0] == Approx(4.0 / 7));  // renormalised, not scaled
  g.scale_only_unnormalised = false;  // V3's rule
  r = route_from_logits(g, logits.data(), 1);
  CHECK(r.weights[0] == Approx(4.0 / 7 * 16));
}
