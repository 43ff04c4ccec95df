// The GPU path against the CPU oracle: gating decisions, expert FFNs (bf16 on the device, against a
// float64 reference), whole MoE layers, and the fixture models decoded with GPU experts.
#include "model/cuda/gpu_moe.hpp"
#include "model/generate.hpp"
#include "model/gating.hpp"
#include "model/make_model.hpp"
#include "model/moe.hpp"
#include "model/weights.hpp"
#include "tests/actors/reference.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <span>

using namespace sy::model;
namespace gpu = sy::model::cuda;

namespace {

std::vector<float> randv(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// ‖a − b‖ / ‖b‖ (b the reference).
double norm_err(std::span<const float> a, std::span<const double> b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

/// Widths our grouped GEMM kernels take (the device under test is an sm_90 one).
bool fused_shapes(int64_t h, int64_t f) { return h % 256 == 0 && f % 128 == 0; }

/// The largest relative error of a row: max over rows of ‖a_r − b_r‖ / ‖b_r‖.
double worst_row_err(const std::vector<float>& a, const std::vector<double>& b, int64_t width) {
  const auto w = static_cast<size_t>(width);
  double worst = 0;
  for (size_t r = 0; r * w < a.size(); ++r)
    worst = std::max(worst, norm_err(std::span(a).subspan(r * w, w), std::span(b).subspan(r * w, w)));
  return worst;
}

expert_weights random_expert(int64_t h, int64_t f, uint32_t seed, dtype dt) {
  expert_weights w;
  w.gate_up = matrix::from_f32(dt, randv(static_cast<size_t>(2 * f * h), seed, 1.0f / std::sqrt(float(h))), 2 * f, h);
  w.down = matrix::from_f32(dt, randv(static_cast<size_t>(h * f), seed + 1, 1.0f / std::sqrt(float(f))), h, f);
  return w;
}

/// Float64 SwiGLU expert on f32 weights (the reference the bf16 device path is held to).
std::vector<double> expert_f64(const expert_weights& w, const std::vector<float>& x, int64_t n) {
  const int64_t h = w.hidden(), f = w.ffn();
  auto gu = w.gate_up.to_f32(), dn = w.down.to_f32();
  std::vector<double> y(static_cast<size_t>(n * h), 0.0), hid(static_cast<size_t>(f));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < f; ++j) {
      double g = 0, u = 0;
      for (int64_t c = 0; c < h; ++c) {
        g += double(gu[size_t(j * h + c)]) * x[size_t(r * h + c)];
        u += double(gu[size_t((f + j) * h + c)]) * x[size_t(r * h + c)];
      }
      hid[size_t(j)] = g / (1 + std::exp(-g)) * u;
    }
    for (int64_t c = 0; c < h; ++c) {
      double s = 0;
      for (int64_t j = 0; j < f; ++j) s += double(dn[size_t(c * f + j)]) * hid[size_t(j)];
      y[size_t(r * h + c)] = s;
    }
  }
  return y;
}

/// The CPU MoE layer (gate → dispatch → local experts → combine), skipping experts not held.
std::vector<float> cpu_layer(const gating_config& g, const matrix& router, const float* bias,
                             const std::vector<layer_experts>& experts, const std::vector<float>& x, int64_t t,
                             int64_t h) {
  auto r = gate(g, router, bias, x.data(), t);
  auto plan = plan_dispatch(r, g.num_experts);
  std::erase_if(plan.batches, [&](const expert_batch& b) { return !experts[0].experts[size_t(b.expert)]; });
  std::vector<std::vector<float>> in, out;
  gather_rows(plan, x.data(), h, in);
  local_expert_executor ex(&experts);
  REQUIRE_FALSE(ex.run(0, plan, in, out));
  std::vector<float> y(size_t(t * h), 0.0f);
  combine(plan, out, h, y.data());
  return y;
}

/// One layer (L[0]) of n random experts in bf16, packed as the CPU layer runs them (expert e from
/// seed + e), and their pointers for gpu_moe_layer::make.
std::vector<const expert_weights*> random_layer(std::vector<layer_experts>& L, int n, int64_t h, int64_t f, uint32_t seed) {
  L.clear();
  L.resize(1);
  L[0].experts.resize(size_t(n));
  std::vector<const expert_weights*> ptrs;
  for (int e = 0; e < n; ++e) {
    L[0].experts[size_t(e)] = std::make_unique<expert_weights>(random_expert(h, f, seed + uint32_t(e), dtype::bf16));
    L[0].experts[size_t(e)]->pack();
    ptrs.push_back(L[0].experts[size_t(e)].get());
  }
  return ptrs;
}

/// A layer of `experts` random bf16 experts (expert e from expert_seed + e), top-k with normalised
/// weights, a random router of `router_type` values: as the CPU runs it (g, router, L) and on device 0.
struct random_moe {
  gating_config g;
  matrix router;
  std::vector<layer_experts> L;
  std::unique_ptr<gpu::gpu_moe_layer> layer;
};
random_moe make_random_moe(int experts, int top_k, int64_t h, int64_t f, dtype router_type, uint32_t router_seed,
                           uint32_t expert_seed) {
  random_moe m;
  m.g.num_experts = experts, m.g.top_k = top_k, m.g.norm_topk_prob = true;
  m.router = matrix::from_f32(router_type, randv(size_t(experts * h), router_seed, 1.0f / std::sqrt(float(h))), experts, h);
  const auto ptrs = random_layer(m.L, experts, h, f, expert_seed);
  auto layer = gpu::gpu_moe_layer::make(0, m.g, m.router, nullptr, ptrs);
  REQUIRE(layer);
  m.layer = std::move(*layer);
  return m;
}

/// Tokens whose expert choices differ between the device's routing and the CPU's. Logits come
/// from two different fp32 GEMMs, so a choice may differ where the CPU's scores nearly tie; the
/// weights of every other token must match to float rounding (checked here).
int differing_rows(const routing& got, const routing& want, int64_t t, int k) {
  int differing = 0;
  for (int64_t r = 0; r < t; ++r) {
    bool same = true;
    for (int j = 0; j < k; ++j) same &= got.experts[size_t(r * k + j)] == want.experts[size_t(r * k + j)];
    if (!same) {
      ++differing;
      continue;
    }
    for (int j = 0; j < k; ++j)
      CHECK(got.weights[size_t(r * k + j)] == Approx(want.weights[size_t(r * k + j)]).epsilon(1e-5));
  }
  return differing;
}

}  // namespace

TEST_CASE("gpu: the gating kernel makes the CPU's choices, for every family's rule", "[gpu]") {
  struct variant {
    const char* name;
    gating_config g;
    bool bias;
  };
  std::vector<variant> vs;
  gating_config g;
  g.num_experts = 8, g.top_k = 2, g.norm_topk_prob = true;
  vs.push_back({"mixtral softmax top-2 renormalised", g, false});
  g.num_experts = 64, g.top_k = 4, g.norm_topk_prob = false;
  vs.push_back({"qwen2 softmax top-4", g, false});
  g = {};
  g.num_experts = 256, g.top_k = 8, g.scoring = scoring_func::sigmoid, g.method = topk_method::noaux_tc;
  g.norm_topk_prob = true, g.routed_scaling_factor = 2.5, g.n_group = 8, g.topk_group = 4, g.has_score_bias = true;
  g.norm_eps = 1e-20;
  vs.push_back({"deepseek-v3 sigmoid + bias, 8 groups / 4", g, true});
  g = {};
  g.num_experts = 160, g.top_k = 6, g.method = topk_method::group_limited_greedy, g.n_group = 8, g.topk_group = 3;
  g.routed_scaling_factor = 16.0, g.scale_only_unnormalised = true, g.norm_eps = 1e-20;
  vs.push_back({"deepseek-v2 softmax group-limited greedy", g, false});
  // Four and up to sixteen experts a lane in the warp's top-k (the lanes' sorted registers), the
  // last with lanes whose slots run past the experts.
  g = {};
  g.num_experts = 128, g.top_k = 8, g.norm_topk_prob = true;
  vs.push_back({"qwen3 softmax top-8 of 128", g, false});
  g.num_experts = 400, g.top_k = 10;
  vs.push_back({"softmax top-10 of 400", g, false});
  // Hidden 128: a bf16 router's pieces run in the one-pass kernel (whole 64-wide chunks); 96: as
  // cuBLAS's products.
  for (const int64_t h : {int64_t{128}, int64_t{96}})
  for (auto& v : vs)
   for (auto router_type : {dtype::f32, dtype::bf16}) {
    INFO(v.name << ", router " << (router_type == dtype::f32 ? "f32" : "bf16") << ", hidden " << h);
    // A bf16 router (as in bf16 checkpoints) takes one bf16 piece a weight in the split GEMM, an
    // f32 one three.
    auto router = matrix::from_f32(router_type, randv(size_t(v.g.num_experts * h), 1, 0.3f), v.g.num_experts, h);
    auto bias = randv(size_t(v.g.num_experts), 2, 0.5f);
    // Tiny experts: this case is about the routing.
    std::vector<expert_weights> store;
    for (int e = 0; e < v.g.num_experts; ++e) store.push_back(random_expert(h, 16, 10 + e, dtype::f32));
    std::vector<const expert_weights*> ptrs;
    for (auto& e : store) ptrs.push_back(&e);
    auto layer = gpu::gpu_moe_layer::make(0, v.g, router, v.bias ? bias.data() : nullptr, ptrs);
    REQUIRE(layer);
    // 300 tokens: the batched gating kernel; 5: the one-block routing of the device-only path.
    // 300 tokens with the router GEMM in bf16 pieces, in f32 (cublasSgemm) and as automatic takes
    // it (f32: these tiny experts do not run our fused kernels).
    using rg = gpu::gpu_moe_layer::router_gemm;
    for (auto [t, how] : {std::pair{int64_t{300}, rg::bf16_pieces}, std::pair{int64_t{300}, rg::f32},
                          std::pair{int64_t{300}, rg::automatic}, std::pair{int64_t{5}, rg::automatic}}) {
    INFO(t << " tokens, router GEMM " << int(how));
    auto x = randv(size_t(t * h), 3 + uint32_t(t), 1.0f);
    std::vector<float> y(size_t(t * h));
    (*layer)->set_router_gemm(how);
    REQUIRE_FALSE((*layer)->forward(x.data(), t, y.data()));
    CHECK(((*layer)->last_gemm_mode() == gpu::gemm_mode::gemv) == (t <= gpu::gemv_max_rows));
    CHECK((*layer)->last_router_parts() ==
          (t <= gpu::gemv_max_rows ? 0 : how != rg::bf16_pieces ? 1 : router_type == dtype::bf16 ? 3 : 6));
    auto got = (*layer)->last_routing();
    REQUIRE(got);
    auto want = gate(v.g, router, v.bias ? bias.data() : nullptr, x.data(), t);
    CHECK(differing_rows(*got, want, t, v.g.top_k) <= 1);
    }
  }
}

TEST_CASE("gpu: a layer refuses a top-k of none or of more than its experts, naming it", "[gpu]") {
  // The gating kernels take k distinct experts: a k past the expert count would index past them.
  std::vector<layer_experts> L;
  const auto ptrs = random_layer(L, 8, 64, 32, 1);
  const auto router = matrix::from_f32(dtype::f32, randv(size_t(8 * 64), 1, 0.1f), 8, 64);
  gating_config g;
  g.num_experts = 8;
  for (int k : {0, 9}) {
    INFO("top-" << k);
    g.top_k = k;
    auto layer = gpu::gpu_moe_layer::make(0, g, router, nullptr, ptrs);
    REQUIRE_FALSE(layer);
    CHECK_THAT(describe(layer.error()), Catch::Contains("top-k"));
  }
  g.top_k = 8;
  CHECK(gpu::gpu_moe_layer::make(0, g, router, nullptr, ptrs));
}

TEST_CASE("gpu: the gating kernels break exact ties as the CPU does (lower expert id first)", "[gpu]") {
  // A zero router: every logit is exactly 0 whatever the GEMM's order of sums, so every expert's
  // score ties; with a bias that lifts every `lift`-th expert, those tie above the rest. The choices
  // must be the lowest ids, in id order, on both gating kernels (300 tokens: a warp per token in a
  // grid; 5: the one-block routing).
  struct variant {
    const char* name;
    gating_config g;
    int lift;               // the bias lifts experts e % lift == 0; 0: no bias
    std::vector<int> want;  // the experts every token must choose, in rank order
  };
  std::vector<variant> vs;
  gating_config g;
  g.num_experts = 8, g.top_k = 2, g.norm_topk_prob = true;
  vs.push_back({"softmax top-2 of 8", g, 0, {0, 1}});
  g.num_experts = 128, g.top_k = 8, g.norm_topk_prob = true;
  vs.push_back({"softmax top-8 of 128", g, 0, {0, 1, 2, 3, 4, 5, 6, 7}});
  g.num_experts = 64, g.top_k = 32, g.norm_topk_prob = true;  // the most top_k allowed: every lane normalises a weight
  std::vector<int> first32(32);
  for (int j = 0; j < 32; ++j) first32[size_t(j)] = j;
  vs.push_back({"softmax top-32 of 64", g, 0, first32});
  g = {};
  g.num_experts = 256, g.top_k = 8, g.scoring = scoring_func::sigmoid, g.method = topk_method::noaux_tc;
  g.norm_topk_prob = true, g.routed_scaling_factor = 2.5, g.n_group = 8, g.topk_group = 4, g.has_score_bias = true;
  g.norm_eps = 1e-20;
  // One lifted expert a group (32 experts each): every group scores 0.75 + 0.5 and ties, groups 0-3
  // stay; then the four lifted ones, then the lowest ids of the kept groups. Without the group
  // limit the choice would be 0, 32, ..., 224; keeping other groups would show ids from 128.
  vs.push_back({"sigmoid + bias, 8 groups / 4", g, 32, {0, 32, 64, 96, 1, 2, 3, 4}});
  g = {};
  g.num_experts = 64, g.top_k = 6, g.scoring = scoring_func::sigmoid, g.has_score_bias = true;
  g.norm_topk_prob = true, g.norm_eps = 1e-20;
  vs.push_back({"sigmoid + bias, no groups", g, 4, {0, 4, 8, 12, 16, 20}});
  const int64_t h = 128;
  for (auto& v : vs) {
    INFO(v.name);
    const auto E = v.g.num_experts;
    auto router = matrix::from_f32(dtype::bf16, std::vector<float>(size_t(E * h), 0.0f), E, h);
    std::vector<float> bias(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) bias[size_t(e)] = v.lift > 0 && e % v.lift == 0 ? 0.25f : 0.0f;
    std::vector<expert_weights> store;
    for (int64_t e = 0; e < E; ++e) store.push_back(random_expert(h, 16, 40 + uint32_t(e), dtype::f32));
    std::vector<const expert_weights*> ptrs;
    for (auto& e : store) ptrs.push_back(&e);
    const float* b = v.lift > 0 ? bias.data() : nullptr;
    auto layer = gpu::gpu_moe_layer::make(0, v.g, router, b, ptrs);
    REQUIRE(layer);
    for (const int64_t t : {int64_t{300}, int64_t{5}}) {
      INFO(t << " tokens");
      auto x = randv(size_t(t * h), 50 + uint32_t(t), 1.0f);
      std::vector<float> y(size_t(t * h));
      REQUIRE_FALSE((*layer)->forward(x.data(), t, y.data()));
      auto got = (*layer)->last_routing();
      REQUIRE(got);
      auto want = gate(v.g, router, b, x.data(), t);
      const int k = v.g.top_k;
      int wrong = 0, cpu_wrong = 0;
      for (int64_t r = 0; r < t; ++r)
        for (int j = 0; j < k; ++j) {
          const size_t i = size_t(r * k + j);
          wrong += got->experts[i] != v.want[size_t(j)];
          cpu_wrong += want.experts[i] != v.want[size_t(j)];
          CHECK(got->weights[i] == Approx(want.weights[i]).epsilon(1e-6));
        }
      CHECK(wrong == 0);
      CHECK(cpu_wrong == 0);
    }
  }
}

TEST_CASE("gpu: the one-pass router kernel routes as the CPU does over long ranges of H", "[gpu]") {
  // Qwen3-shaped routing (128 experts, top-8, hidden 2048) with a bf16 router: at 2000 and 4096
  // tokens each block of router_pass_kernel runs several 64-wide chunks of H (its shared-memory
  // ring wraps, the split of one chunk overlaps the products of the last), where the gating
  // test's short steps give each block one chunk.
  gating_config g;
  g.num_experts = 128, g.top_k = 8, g.norm_topk_prob = true;
  const int64_t h = 2048;
  auto router = matrix::from_f32(dtype::bf16, randv(size_t(g.num_experts * h), 21, 1.0f / std::sqrt(float(h))),
                                 g.num_experts, h);
  std::vector<expert_weights> store;  // tiny experts: this case is about the routing
  for (int e = 0; e < g.num_experts; ++e) store.push_back(random_expert(h, 16, 500 + uint32_t(e), dtype::bf16));
  std::vector<const expert_weights*> ptrs;
  for (auto& e : store) ptrs.push_back(&e);
  auto layer = gpu::gpu_moe_layer::make(0, g, router, nullptr, ptrs);
  REQUIRE(layer);
  (*layer)->set_router_gemm(gpu::gpu_moe_layer::router_gemm::bf16_pieces);
  for (int64_t t : {int64_t{2000}, int64_t{4096}}) {
    INFO(t << " tokens");
    auto x = randv(size_t(t * h), 23 + uint32_t(t), 1.0f);
    std::vector<float> y(size_t(t * h));
    REQUIRE_FALSE((*layer)->forward(x.data(), t, y.data()));
    CHECK((*layer)->last_router_parts() == 3);
    auto got = (*layer)->last_routing();
    REQUIRE(got);
    CHECK(differing_rows(*got, gate(g, router, nullptr, x.data(), t), t, g.top_k) <= 2);
  }
}

TEST_CASE("gpu: expert FFNs in bf16 stay within 1e-2 of float64, the CPU fp32 path within 1e-4", "[gpu]") {
  for (auto [h, f, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{256, 512, 37}, {2048, 768, 64}, {4096, 14336, 8}, {100, 60, 13}}) {
    INFO("hidden " << h << ", ffn " << f << ", rows " << n);
    auto w = random_expert(h, f, 7, dtype::f32);
    auto x = randv(size_t(n * h), 8, 1.0f);
    auto ref = expert_f64(w, x, n);
    std::vector<float> cpu(size_t(n * h)), dev(size_t(n * h), std::nanf(""));
    expert_forward(w, x.data(), n, cpu.data());
    CHECK(norm_err(cpu, ref) < 1e-4);
    auto g = gpu::gpu_experts::make(0, h, f);
    REQUIRE(g);
    REQUIRE_FALSE((*g)->add_expert(3, w));
    const int id = 3;
    const float* in = x.data();
    float* out = dev.data();
    REQUIRE_FALSE((*g)->run({&id, 1}, {&in, 1}, {&n, 1}, {&out, 1}));
    const double e = norm_err(dev, ref);
    INFO("gpu error " << e);
    CHECK(e < 1e-2);
    CHECK(std::none_of(dev.begin(), dev.end(), [](float v) { return std::isnan(v); }));
  }
}

TEST_CASE("gpu: an expert set runs many experts at once within 1e-2 of float64, on every launch kind", "[gpu]") {
  // 100 × 60: widths that are not multiples of 8 (no GEMV path, the scalar conversion kernels).
  for (auto [h, f] : std::vector<std::pair<int64_t, int64_t>>{{256, 512}, {2048, 768}, {100, 60}}) {
    const std::vector<int> ids = {9, 3, 4, 12};
    auto g = gpu::gpu_experts::make(0, h, f);
    REQUIRE(g);
    std::vector<expert_weights> ws;
    for (int id : ids) {
      ws.push_back(random_expert(h, f, 40 + uint32_t(id), dtype::bf16));
      REQUIRE_FALSE((*g)->add_expert(id, ws.back()));
    }
    // Up to 8 rows per expert (the GEMV path in automatic mode), and more (padded or grouped).
    for (auto rows : std::vector<std::vector<int64_t>>{{1, 8, 0, 5}, {3, 1, 1, 2}, {20, 33, 7, 9}}) {
      std::vector<std::vector<float>> x, y;
      std::vector<std::vector<double>> ref;
      for (size_t i = 0; i < ids.size(); ++i) {
        x.push_back(randv(size_t(rows[i] * h), 70 + uint32_t(i), 1.0f));
        ref.push_back(expert_f64(ws[i], x.back(), rows[i]));
      }
      for (auto mode : {gpu::gemm_mode::automatic, gpu::gemm_mode::grouped, gpu::gemm_mode::per_expert,
                        gpu::gemm_mode::padded, gpu::gemm_mode::gemv, gpu::gemm_mode::fused}) {
        INFO("hidden " << h << ", rows " << rows[0] << "/" << rows[1] << "/" << rows[2] << "/" << rows[3] << ", mode "
                       << gpu::to_string(mode));
        (*g)->set_gemm_mode(mode);
        y.assign(ids.size(), {});
        std::vector<const float*> in;
        std::vector<float*> out;
        for (size_t i = 0; i < ids.size(); ++i) {
          y[i].assign(size_t(rows[i] * h), std::nanf(""));
          in.push_back(x[i].data());
          out.push_back(y[i].data());
        }
        REQUIRE_FALSE((*g)->run(ids, in, rows, out));
        const bool small = *std::max_element(rows.begin(), rows.end()) <= gpu::gemv_max_rows && h % 8 == 0 && f % 8 == 0;
        if (mode == gpu::gemm_mode::automatic || mode == gpu::gemm_mode::gemv) {
          if (small) CHECK((*g)->last_gemm_mode() == gpu::gemm_mode::gemv);
          else CHECK((*g)->last_gemm_mode() != gpu::gemm_mode::gemv);
        } else if (mode == gpu::gemm_mode::fused) {
          CHECK(((*g)->last_gemm_mode() == gpu::gemm_mode::fused) == fused_shapes(h, f));
        } else {
          CHECK((*g)->last_gemm_mode() == mode);
        }
        for (size_t i = 0; i < ids.size(); ++i) {
          if (rows[i] == 0) continue;
          INFO("expert " << ids[i]);
          CHECK(norm_err(y[i], ref[i]) < 1e-2);
        }
      }
    }
  }
}

TEST_CASE("gpu: our grouped GEMM kernels get every row right at the tiles' edges", "[gpu]") {
  // Row counts around the kernels' 64-row halves and 128-row tiles, one expert per count, in an
  // order that is not the ids'; every row is held to float64 on its own.
  const int64_t h = 512, f = 384;
  auto g = gpu::gpu_experts::make(0, h, f);
  REQUIRE(g);
  const std::vector<int64_t> rows = {1, 63, 64, 65, 127, 128, 129, 300, 8, 191, 5};
  std::vector<int> ids;
  std::vector<expert_weights> ws;
  std::vector<std::vector<float>> x, y(rows.size());
  std::vector<std::vector<double>> ref;
  std::vector<const float*> in;
  std::vector<float*> out;
  for (size_t i = 0; i < rows.size(); ++i) {
    ids.push_back(int((i * 3) % rows.size()));
    ws.push_back(random_expert(h, f, 500 + uint32_t(i), dtype::bf16));
    REQUIRE_FALSE((*g)->add_expert(ids.back(), ws.back()));
    x.push_back(randv(size_t(rows[i] * h), 600 + uint32_t(i), 1.0f));
    ref.push_back(expert_f64(ws[i], x.back(), rows[i]));
    y[i].assign(size_t(rows[i] * h), std::nanf(""));
    in.push_back(x[i].data());
    out.push_back(y[i].data());
  }
  // Clusters of two: the nine experts of an odd tile count pair their last tiles across experts
  // (300 rows: a pair of its own, then its third tile with another expert's), the ninth's ends
  // the list beside an empty tile.
  for (int cluster : {1, 2})
    for (auto mode : {gpu::gemm_mode::fused, gpu::gemm_mode::automatic}) {
      INFO("mode " << gpu::to_string(mode) << ", cluster " << cluster);
      (*g)->set_gemm_mode(mode);
      (*g)->set_fused_tuning({cluster});
      for (auto& v : y) std::fill(v.begin(), v.end(), std::nanf(""));
      REQUIRE_FALSE((*g)->run(ids, in, rows, out));
      // Automatic takes them too: eleven small experts (not few large ones, 98 rows on average),
      // above the GEMV path.
      REQUIRE((*g)->last_gemm_mode() == gpu::gemm_mode::fused);
      CHECK((*g)->last_fused_cluster() == cluster);  // every sm_90 device runs clusters of two
      for (size_t i = 0; i < rows.size(); ++i) {
        INFO("expert " << ids[i] << ", " << rows[i] << " rows");
        CHECK(worst_row_err(y[i], ref[i], h) < 2e-2);
        CHECK(norm_err(y[i], ref[i]) < 1e-2);
      }
    }
  (*g)->set_fused_tuning({});

  {
    // Above one and a half tiles an expert on average, automatic leaves an evenly spread batch to
    // cuBLAS's padded batch (faster there; docs/benchmarks.md); asked for, fused still runs it.
    const std::vector<int64_t> big(4, 256);
    std::vector<int> bid(ids.begin(), ids.begin() + 4);
    std::vector<std::vector<float>> bx, by(4);
    std::vector<const float*> bin;
    std::vector<float*> bout;
    for (size_t i = 0; i < 4; ++i) {
      bx.push_back(randv(size_t(256 * h), 900 + uint32_t(i), 1.0f));
      by[i].assign(size_t(256 * h), std::nanf(""));
      bin.push_back(bx[i].data());
      bout.push_back(by[i].data());
    }
    for (auto [mode, want] : {std::pair{gpu::gemm_mode::automatic, gpu::gemm_mode::padded},
                              std::pair{gpu::gemm_mode::fused, gpu::gemm_mode::fused}}) {
      INFO("mode " << gpu::to_string(mode));
      (*g)->set_gemm_mode(mode);
      REQUIRE_FALSE((*g)->run(bid, bin, big, bout));
      CHECK((*g)->last_gemm_mode() == want);
      for (size_t i = 0; i < 4; ++i) CHECK(norm_err(by[i], expert_f64(ws[i], bx[i], 256)) < 1e-2);
    }
  }

  // A whole layer: the gate_up kernel reads the token rows through the routing's row index.
  // 16 experts, top-4, 500 tokens: ~125 rows an expert, most crossing a tile edge.
  auto m = make_random_moe(16, 4, h, f, dtype::f32, 7, 700);
  auto& layer = *m.layer;
  const int64_t t = 500;
  auto xl = randv(size_t(t * h), 11, 1.0f);
  const auto want = to_double(cpu_layer(m.g, m.router, nullptr, m.L, xl, t, h));
  std::vector<float> padded(size_t(t * h), std::nanf(""));
  layer.set_gemm_mode(gpu::gemm_mode::padded);
  REQUIRE_FALSE(layer.forward(xl.data(), t, padded.data()));
  // Tile lists made on the host from the counts and on the device, single CTAs and pairs; the
  // kernels from the gating on launched to overlap the one before them, and not.
  layer.set_gemm_mode(gpu::gemm_mode::fused);
  for (bool plan : {true, false})
    for (int cluster : {1, 2}) {
      std::vector<float> overlapped;
      for (bool pdl : {true, false}) {
        INFO((plan ? "planned on the device" : "planned on the host") << ", cluster " << cluster
                                                                       << (pdl ? ", overlapped launches" : ", serial launches"));
        std::vector<float> fused(size_t(t * h), std::nanf(""));
        layer.set_device_plan(plan);
        layer.set_fused_tuning({cluster, pdl});
        REQUIRE_FALSE(layer.forward(xl.data(), t, fused.data()));
        REQUIRE(layer.last_gemm_mode() == gpu::gemm_mode::fused);
        CHECK(layer.last_device_planned() == plan);
        CHECK(layer.last_fused_cluster() == cluster);
        CHECK(norm_err(fused, want) < 1e-2);
        // Same routing on the device: every token's row agrees with the padded cuBLAS path.
        CHECK(worst_row_err(fused, to_double(padded), h) < 2e-2);
        // The same kernels in the same order of sums: overlapping launches change no bit.
        if (pdl) overlapped = fused;
        else CHECK(std::memcmp(fused.data(), overlapped.data(), fused.size() * sizeof(float)) == 0);
      }
    }
}

TEST_CASE("gpu: a large step's overlapped launches (programmatic dependent launch) change no bit", "[gpu]") {
  // More work items than SMs in both GEMM kernels (64 experts of ~256 rows: 256 down items on a
  // single CTA each), so down's CTAs start while gate_up's last items run and each takes several;
  // a bf16 router, so the one-pass router kernel starts the chain.
  const int64_t h = 512, f = 384, t = 4096;
  auto m = make_random_moe(64, 4, h, f, dtype::bf16, 5, 900);
  auto& layer = *m.layer;
  auto x = randv(size_t(t * h), 13, 1.0f);
  const auto want = to_double(cpu_layer(m.g, m.router, nullptr, m.L, x, t, h));
  layer.set_gemm_mode(gpu::gemm_mode::fused);
  for (int cluster : {1, 2}) {
    INFO("cluster " << cluster);
    std::vector<float> serial(size_t(t * h), std::nanf(""));
    layer.set_fused_tuning({cluster, false});
    REQUIRE_FALSE(layer.forward(x.data(), t, serial.data()));
    REQUIRE(layer.last_device_planned());
    CHECK(layer.last_fused_cluster() == cluster);
    CHECK(layer.last_router_parts() == 3);
    CHECK(norm_err(serial, want) < 1e-2);
    // Overlapped, ten times: a read that raced its producer would show as a changed bit.
    layer.set_fused_tuning({cluster, true});
    int differing = 0;
    for (int rep = 0; rep < 10; ++rep) {
      std::vector<float> y(size_t(t * h), std::nanf(""));
      REQUIRE_FALSE(layer.forward(x.data(), t, y.data()));
      differing += std::memcmp(y.data(), serial.data(), y.size() * sizeof(float)) != 0;
    }
    CHECK(differing == 0);
  }
}

TEST_CASE("gpu: automatic mode pads row counts only while padding is cheap, and every layout stays within 1e-2 of float64", "[gpu]") {
  // A hidden size our grouped GEMM kernels do not take (not a multiple of 256), so automatic
  // chooses among cuBLAS's layouts.
  const int64_t h = 192, f = 512;
  auto g = gpu::gpu_experts::make(0, h, f);
  REQUIRE(g);
  // 24 small experts, in an order that is not their ids': 8 with ~100 rows, 8 with ~40, 8 with
  // ~10 (1174 rows; padded to 104 each, 2496: more than half again, so grouped), then equal
  // counts of 70 (above padded_free_rows, no padding: padded), then counts of 9-64 (no more than
  // padded_free_rows: padded however uneven).
  std::vector<int> ids;
  std::vector<expert_weights> ws;
  for (int i = 0; i < 24; ++i) {
    ids.push_back((i * 7) % 24);
    ws.push_back(random_expert(h, f, 200 + uint32_t(ids.back()), dtype::bf16));
    REQUIRE_FALSE((*g)->add_expert(ids.back(), ws.back()));
  }
  struct batch {
    const char* name;
    std::vector<int64_t> rows;
    gpu::gemm_mode want;
  };
  std::vector<batch> batches(3);
  batches[0] = {"spread 9-101", {}, gpu::gemm_mode::grouped};
  batches[1] = {"equal 70", std::vector<int64_t>(24, 70), gpu::gemm_mode::padded};
  batches[2] = {"spread 9-64", {}, gpu::gemm_mode::padded};
  for (int i = 0; i < 24; ++i) {
    batches[0].rows.push_back(i % 3 == 0 ? 97 + i % 5 : i % 3 == 1 ? 37 + i % 4 : 9 + i % 2);
    batches[2].rows.push_back(i == 5 ? gpu::padded_free_rows : 9 + i % 4);
  }
  uint32_t seed = 300;
  for (const auto& bt : batches) {
    std::vector<std::vector<float>> x, y(ids.size());
    std::vector<std::vector<double>> ref;
    std::vector<const float*> in;
    std::vector<float*> out;
    for (size_t i = 0; i < ids.size(); ++i) {
      x.push_back(randv(size_t(bt.rows[i] * h), seed++, 1.0f));
      ref.push_back(expert_f64(ws[i], x.back(), bt.rows[i]));
    }
    for (auto mode : {gpu::gemm_mode::automatic, gpu::gemm_mode::padded}) {
      INFO(bt.name << ", mode " << gpu::to_string(mode));
      in.clear(), out.clear();
      for (size_t i = 0; i < ids.size(); ++i) {
        y[i].assign(size_t(bt.rows[i] * h), std::nanf(""));
        in.push_back(x[i].data());
        out.push_back(y[i].data());
      }
      (*g)->set_gemm_mode(mode);
      REQUIRE_FALSE((*g)->run(ids, in, bt.rows, out));
      CHECK((*g)->last_gemm_mode() == (mode == gpu::gemm_mode::padded ? mode : bt.want));
      for (size_t i = 0; i < ids.size(); ++i) {
        INFO("expert " << ids[i] << ", " << bt.rows[i] << " rows");
        CHECK(norm_err(y[i], ref[i]) < 1e-2);
      }
    }
  }
}

TEST_CASE("gpu: whole MoE layers equal the CPU layer within bf16 tolerance", "[gpu]") {
  struct shape {
    const char* name;
    int64_t h, f;
    int e, k, local, groups, topk_groups;
    bool deepseek;
    int64_t t;
  };
  for (auto s : std::vector<shape>{{"small mixtral", 256, 384, 8, 2, 8, 1, 1, false, 50},
                                   {"small experts of two tiles each, bf16 router", 256, 384, 8, 2, 8, 1, 1, false, 700},
                                   {"qwen3-30b-a3b shape", 2048, 768, 128, 8, 128, 1, 1, false, 64},
                                   {"deepseek-v3 host, 32 of 64 experts", 1024, 512, 64, 8, 32, 8, 4, true, 40},
                                   {"mixtral-8x7b shape", 4096, 14336, 8, 2, 8, 1, 1, false, 16},
                                   {"widths not multiples of 8", 100, 60, 8, 2, 8, 1, 1, false, 40}}) {
    INFO(s.name);
    gating_config g;
    g.num_experts = s.e, g.top_k = s.k, g.norm_topk_prob = true;
    std::vector<float> bias;
    if (s.deepseek) {
      g.scoring = scoring_func::sigmoid, g.method = topk_method::noaux_tc, g.n_group = s.groups;
      g.topk_group = s.topk_groups, g.routed_scaling_factor = 2.5, g.has_score_bias = true, g.norm_eps = 1e-20;
      bias = randv(size_t(s.e), 5, 0.1f);
    }
    // One shape's router holds bf16 values (as bf16 checkpoints store it): automatic takes the
    // router GEMM in bf16 pieces for its large fused steps.
    const bool bf16_router = s.t >= gpu::gpu_moe_layer::router_pieces_from;
    auto router = matrix::from_f32(bf16_router ? dtype::bf16 : dtype::f32,
                                   randv(size_t(s.e * s.h), 1, 1.0f / std::sqrt(float(s.h))), s.e, s.h);
    std::vector<layer_experts> L(1);
    L[0].experts.resize(size_t(s.e));
    std::vector<const expert_weights*> ptrs(size_t(s.e), nullptr);
    for (int e = 0; e < s.local; ++e) {
      L[0].experts[size_t(e)] = std::make_unique<expert_weights>(random_expert(s.h, s.f, 100 + e, dtype::bf16));
      L[0].experts[size_t(e)]->pack();
      ptrs[size_t(e)] = L[0].experts[size_t(e)].get();
    }
    auto layer = gpu::gpu_moe_layer::make(0, g, router, bias.empty() ? nullptr : bias.data(), ptrs);
    REQUIRE(layer);
    for (int64_t t : {int64_t{1}, int64_t{3}, int64_t{8}, s.t}) {
      auto x = randv(size_t(t * s.h), 9 + uint32_t(t), 1.0f);
      auto want = cpu_layer(g, router, bias.empty() ? nullptr : bias.data(), L, x, t, s.h);
      for (auto mode : {gpu::gemm_mode::automatic, gpu::gemm_mode::grouped, gpu::gemm_mode::per_expert,
                        gpu::gemm_mode::padded, gpu::gemm_mode::gemv, gpu::gemm_mode::fused})
       for (bool plan : {true, false})
        for (auto how : {gpu::gpu_moe_layer::router_gemm::automatic, gpu::gpu_moe_layer::router_gemm::bf16_pieces}) {
        using rg = gpu::gpu_moe_layer::router_gemm;
        // Off: the fused path's tile list made on the host after the counts' trip.
        if (!plan && mode != gpu::gemm_mode::fused && mode != gpu::gemm_mode::automatic) continue;
        // The router GEMM in bf16 pieces whatever automatic would take, for the kinds whose
        // choice it is (each path then takes x's bf16 copy from the split, or makes its own).
        if (how == rg::bf16_pieces && mode != gpu::gemm_mode::automatic && mode != gpu::gemm_mode::fused &&
            mode != gpu::gemm_mode::padded)
          continue;
        INFO(t << " tokens, mode " << gpu::to_string(mode) << (plan ? "" : ", planned on the host")
               << (how == rg::bf16_pieces ? ", router GEMM in bf16 pieces" : ""));
        (*layer)->set_gemm_mode(mode);
        (*layer)->set_device_plan(plan);
        (*layer)->set_router_gemm(how);
        std::vector<float> y(size_t(t * s.h), std::nanf(""));
        REQUIRE_FALSE((*layer)->forward(x.data(), t, y.data()));
        const double e = norm_err(y, to_double(want));
        INFO("relative error " << e << ", active experts " << (*layer)->last_active_experts() << ", ran "
                               << gpu::to_string((*layer)->last_gemm_mode()));
        CHECK(e < 1e-2);
        if (mode == gpu::gemm_mode::fused)
          CHECK(((*layer)->last_gemm_mode() == gpu::gemm_mode::fused) == fused_shapes(s.h, s.f));
        // Asked for, `fused` plans its tiles on the device unless told not to.
        if (mode == gpu::gemm_mode::fused)
          CHECK((*layer)->last_device_planned() == (plan && fused_shapes(s.h, s.f)));
        if (!plan) CHECK_FALSE((*layer)->last_device_planned());
        // The router GEMM: automatic takes bf16 pieces for a bf16 router's large device-planned
        // fused steps, f32 elsewhere above the GEMV path.
        if ((*layer)->last_gemm_mode() != gpu::gemm_mode::gemv) {
          const bool pieces = how == rg::bf16_pieces ||
                              (bf16_router && (*layer)->last_device_planned() && t >= gpu::gpu_moe_layer::router_pieces_from);
          CHECK((*layer)->last_router_parts() == (pieces ? (bf16_router ? 3 : 6) : 1));
        }
        // Automatic takes the GEMV path up to 8 tokens, except for few large experts (Mixtral's)
        // at more than two rows per local expert on average.
        const bool few_large = s.local <= 16 && 2 * s.f * s.h >= (int64_t{16} << 20);
        if (mode == gpu::gemm_mode::automatic)
          CHECK(((*layer)->last_gemm_mode() == gpu::gemm_mode::gemv) ==
                (t <= gpu::gemv_max_rows && (!few_large || t * s.k <= 2 * s.local) && s.h % 8 == 0 && s.f % 8 == 0));
        // The active count (brought back from the device on the GEMV path) is the CPU routing's;
        // one near-tie choice may differ between the two fp32 router GEMMs.
        auto r = gate(g, router, bias.empty() ? nullptr : bias.data(), x.data(), t);
        std::vector<bool> hit(size_t(s.e), false);
        for (int id : r.experts) hit[size_t(id)] = id < s.local;
        CHECK(std::abs((*layer)->last_active_experts() - int(std::count(hit.begin(), hit.end(), true))) <= 1);
      }
    }
  }
}

TEST_CASE("gpu: automatic plans few large experts on the device up to a tile an expert on average", "[gpu]") {
  // Few large experts (8 of 1024×8192: 16M weights a gate_up, as automatic counts "large"), top-2:
  // up to 512 tokens (1024 rows, 128 an expert on average) the fused kernels with the tile list
  // made on the device, above that the counts go to the host and cuBLAS's kinds take the step.
  const int64_t h = 1024, f = 8192;
  auto m = make_random_moe(8, 2, h, f, dtype::bf16, 3, 40);
  auto& layer = *m.layer;
  const auto& g = m.g;
  for (int64_t t : {int64_t{512}, int64_t{520}}) {
    INFO(t << " tokens");
    auto x = randv(size_t(t * h), 17 + uint32_t(t), 1.0f);
    std::vector<float> y(size_t(t * h), std::nanf(""));
    REQUIRE_FALSE(layer.forward(x.data(), t, y.data()));
    CHECK(layer.last_device_planned() == (t * g.top_k <= int64_t{128} * g.num_experts));
    CHECK((layer.last_gemm_mode() == gpu::gemm_mode::fused) == (t == 512));
    CHECK(norm_err(y, to_double(cpu_layer(g, m.router, nullptr, m.L, x, t, h))) < 1e-2);
  }
}

TEST_CASE("gpu: every GEMV tuning (rows per warp, per-expert unrolling, dependent launch) gives the CPU layer", "[gpu]") {
  // 264 × 392: output columns that do not fill the last block of either kernel at any tuning.
  struct shape {
    int64_t h, f;
    int e, k;
  };
  for (auto s : std::vector<shape>{{264, 392, 8, 2}, {2048, 768, 128, 8}}) {
    gating_config g;
    g.num_experts = s.e, g.top_k = s.k, g.norm_topk_prob = true;
    auto router = matrix::from_f32(dtype::f32, randv(size_t(s.e * s.h), 3, 1.0f / std::sqrt(float(s.h))), s.e, s.h);
    std::vector<layer_experts> L(1);
    L[0].experts.resize(size_t(s.e));
    std::vector<const expert_weights*> ptrs;
    for (int e = 0; e < s.e; ++e) {
      L[0].experts[size_t(e)] = std::make_unique<expert_weights>(random_expert(s.h, s.f, 300 + e, dtype::bf16));
      ptrs.push_back(L[0].experts[size_t(e)].get());
    }
    auto layer = gpu::gpu_moe_layer::make(0, g, router, nullptr, ptrs);
    REQUIRE(layer);
    (*layer)->set_gemm_mode(gpu::gemm_mode::gemv);
    for (int64_t t : {int64_t{1}, int64_t{2}, int64_t{5}, int64_t{8}}) {
      auto x = randv(size_t(t * s.h), 20 + uint32_t(t), 1.0f);
      const auto want = to_double(cpu_layer(g, router, nullptr, L, x, t, s.h));
      for (int gu : {0, 4, 8})
        for (int dn : {0, 2, 4, 8})
          for (int flags = 0; flags < 4; ++flags) {
            const bool pdl = (flags & 1) != 0, split = (flags & 2) != 0;
            INFO("hidden " << s.h << ", " << t << " tokens, gate_up rows " << gu << ", down rows " << dn << ", pdl " << pdl
                           << ", split " << split);
            (*layer)->set_gemv_tuning({gu, dn, pdl, split});
            std::vector<float> y(size_t(t * s.h), std::nanf(""));
            REQUIRE_FALSE((*layer)->forward(x.data(), t, y.data()));
            CHECK((*layer)->last_gemm_mode() == gpu::gemm_mode::gemv);
            CHECK(norm_err(y, want) < 1e-2);
          }
    }
  }
}

TEST_CASE("gpu: the fixture models decode with GPU experts within bf16 tolerance of transformers", "[gpu]") {
  const std::filesystem::path data = sy::test::test_data();
  for (auto name : {"mixtral_e8k2", "qwen2moe_e8k2_shared", "qwen3moe_e16k4", "deepseekv3_e16k4"}) {
    INFO(name);
    auto dir = data / "hf-tiny" / name;
    auto w = load_model(dir);
    REQUIRE(w);
    auto ex = gpu::gpu_expert_executor::make(0, (*w)->experts);
    REQUIRE(ex);
    decoder d(**w, **ex);
    auto ref = safetensors_file::open(dir / "reference.safetensors");
    REQUIRE(ref);
    auto ids = *read_i64(*(*ref)->find("input_ids"));
    std::vector<std::vector<int32_t>> prompts(2);
    for (size_t i = 0; i < ids.size(); ++i) prompts[i / 12].push_back(int32_t(ids[i]));
    auto logits = prompt_logits(d, prompts);
    REQUIRE(logits);
    std::vector<float> flat;
    for (auto& l : *logits) flat.insert(flat.end(), l.begin(), l.end());
    auto want = *read_f32(*(*ref)->find("logits"));
    const double e = norm_err(flat, to_double(want));
    INFO("relative error " << e);
    CHECK(e < 1e-2);
  }
}
