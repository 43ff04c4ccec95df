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

TEST_CASE("expert_forward_many equals expert_forward on each expert", "[moe]") {
  const int64_t h = 40, f = 70;
  std::vector<std::unique_ptr<expert_weights>> store;
  std::vector<const expert_weights*> ws;
  std::vector<std::vector<float>> xs, ys, want;
  std::vector<const float*> xp;
  std::vector<float*> yp;
  std::vector<int64_t> ns{1, 7, 20, 0};
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-1, 1);
  for (size_t e = 0; e < ns.size(); ++e) {
    std::vector<float> gu(static_cast<size_t>(2 * f * h)), dn(static_cast<size_t>(h * f));
    for (auto& v : gu) v = d(rng) * 0.1f;
    for (auto& v : dn) v = d(rng) * 0.1f;
    auto w = std::make_unique<expert_weights>();
    w->gate_up = matrix::from_f32(dtype::bf16, gu, 2 * f, h);
    w->down = matrix::from_f32(dtype::bf16, dn, h, f);
    if (e != 1) w->pack();  // a mix of packed and plain weights
    xs.emplace_back(static_cast<size_t>(ns[e] * h));
    for (auto& v : xs.back()) v = d(rng);
    ys.emplace_back(static_cast<size_t>(ns[e] * h));
    want.emplace_back(static_cast<size_t>(ns[e] * h));
    expert_forward(*w, xs.back().data(), ns[e], want.back().data());
    ws.push_back(w.get());
    store.push_back(std::move(w));
  }
  for (size_t e = 0; e < ns.size(); ++e) {
    xp.push_back(xs[e].data());
    yp.push_back(ys[e].data());
  }
  expert_forward_many(ws, xp, ns, yp);
  for (size_t e = 0; e < ns.size(); ++e)
    if (ns[e] > 0) CHECK(sy::test::rel_error(ys[e], want[e]) < 1e-6);
}
