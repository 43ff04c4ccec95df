#include "model/moe.hpp"
#include "model/kernels.hpp"
#include "test_util.hpp"

#include <random>

using namespace sy::model;

TEST_CASE("dispatch plan groups rows by expert, ascending, and combine inverts it", "[moe]") {
  routing r;
  r.tokens = 3;
  r.top_k = 2;
  r.experts = {1, 0, 1, 2, 0, 2};
  r.weights = {0.5f, 0.5f, 0.25f, 0.75f, 1.0f, 2.0f};
  auto p = plan_dispatch(r, 4);
  REQUIRE(p.batches.size() == 3);  // expert 3 gets nothing and has no batch
  CHECK(p.batches[0].expert == 0);
  CHECK(p.batches[0].tokens == std::vector<int32_t>{0, 2});
  CHECK(p.batches[1].tokens == std::vector<int32_t>{0, 1});
  CHECK(p.batches[2].tokens == std::vector<int32_t>{1, 2});
  CHECK(p.batches[2].weights == std::vector<float>{0.75f, 2.0f});

  // Identity "experts": combine must give Σ weights · x per token.
  const int64_t h = 2;
  std::vector<float> x{1, 2, 3, 4, 5, 6};
  std::vector<std::vector<float>> in;
  gather_rows(p, x.data(), h, in);
  CHECK(in[0] == std::vector<float>{1, 2, 5, 6});
  std::vector<float> y(6, 0.0f);
  combine(p, in, h, y.data());
  CHECK(y == std::vector<float>{1, 2, 3, 4, 15, 18});
}

TEST_CASE("expert_forward is SwiGLU: down(silu(gate x) * up x)", "[moe]") {
  const int64_t h = 3, f = 2;
  std::vector<float> gate{1, 0, 0, 0, 1, 0}, up{0, 0, 1, 1, 1, 1}, down{1, 0, 0, 1, 1, 1};
  std::vector<float> gu = gate;
  gu.insert(gu.end(), up.begin(), up.end());
  expert_weights w{matrix::from_f32(dtype::f32, gu, 2 * f, h), matrix::from_f32(dtype::f32, down, h, f)};
  std::vector<float> x{0.5f, -1.0f, 2.0f}, y(3);
  expert_forward(w, x.data(), 1, y.data());
  const float h0 = silu(0.5f) * 2.0f, h1 = silu(-1.0f) * 1.5f;
  CHECK(y[0] == Approx(h0));
  CHECK(y[1] == Approx(h1));
  CHECK(y[2] == Approx(h0 + h1));
}

TEST_CASE("local executor refuses an expert it does not hold", "[moe]") {
  std::vector<layer_experts> layers(1);
  layers[0].experts.resize(2);
  local_expert_executor ex(&layers);
  dispatch_plan p;
  p.tokens = 1;
  p.batches.push_back({1, {0}, {1.0f}});
  std::vector<std::vector<float>> in{{1.0f}}, out;
  auto e = ex.run(0, p, in, out);
  REQUIRE(e);
  CHECK_THAT(describe(e), Catch::Contains("not held"));
}
