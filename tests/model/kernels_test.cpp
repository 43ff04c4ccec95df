#include "model/kernels.hpp"
#include "model/rope.hpp"
#include "test_util.hpp"

#include <random>

using namespace sy::model;

namespace {

std::vector<float> random_vec(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace

TEST_CASE("linear: streaming and GEMM paths equal a naive product, f32 and bf16 weights", "[kernels]") {
  const int64_t n = 37, k = 300;  // odd row count and k > one 256-wide chunk exercise the tails
  auto wv = random_vec(static_cast<size_t>(n * k), 1);
  auto bias = random_vec(static_cast<size_t>(n), 2);
  for (int variant = 0; variant < 3; ++variant) {
    const dtype st = variant == 0 ? dtype::f32 : dtype::bf16;
    matrix w = matrix::from_f32(st, wv, n, k);
    if (variant == 2) {
      w = matrix::packed_from(w);
      CHECK(w.packed());
      CHECK(w.to_f32() == matrix::from_f32(dtype::bf16, wv, n, k).to_f32());
    }
    auto wf = w.to_f32();  // what the kernel should see (bf16-rounded for bf16)
    for (int64_t t : {1, 2, 5, 8, 9, 16, 17, 64}) {
      auto x = random_vec(static_cast<size_t>(t * k), 3 + static_cast<uint32_t>(t));
      std::vector<float> y(static_cast<size_t>(t * n)), ref(y.size());
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = bias[static_cast<size_t>(j)];
          for (int64_t c = 0; c < k; ++c) s += static_cast<double>(x[static_cast<size_t>(i * k + c)]) * wf[static_cast<size_t>(j * k + c)];
          ref[static_cast<size_t>(i * n + j)] = static_cast<float>(s);
        }
      linear(x.data(), t, w, bias.data(), y.data());
      INFO("dtype " << dtype_name(st) << (w.packed() ? " packed" : "") << ", tokens " << t);
      CHECK(sy::test::rel_error(y, ref) < 1e-5);
    }
  }
}

TEST_CASE("bf16 conversion rounds to nearest even", "[kernels]") {
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  // 1 + 2^-8 lies exactly between two bf16 values: ties to the even mantissa (1.0)
  CHECK(f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80);
  CHECK(f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82);
  CHECK(f16_to_f32(f32_to_f16(0.333251953125f)) == 0.333251953125f);
  CHECK(f16_to_f32(0x0001) == Approx(5.960464477539063e-08));
}

TEST_CASE("rmsnorm on a hand-computed row", "[kernels]") {
  std::vector<float> x{3, 4}, w{1, 2}, y(2);
  rmsnorm(x.data(), w.data(), 1, 2, 0.0, y.data());
  const double rms = std::sqrt((9.0 + 16.0) / 2);
  CHECK(y[0] == Approx(3 / rms));
  CHECK(y[1] == Approx(2 * 4 / rms));
}

TEST_CASE("softmax sums to one and keeps order", "[kernels]") {
  std::vector<float> v{1, 2, 3, 1000};
  softmax(v.data(), 4);
  CHECK(v[3] == Approx(1.0));
  std::vector<float> u{0, std::log(3.0f)};
  softmax(u.data(), 2);
  CHECK(u[0] == Approx(0.25));
  CHECK(u[1] == Approx(0.75));
}

TEST_CASE("rope: identity at position 0, hand-computed rotation, norm preserved", "[kernels]") {
  rope_config cfg;
  cfg.theta = 10000.0;
  rope_table r(cfg, 4);
  std::vector<float> v{1, 2, 3, 4};
  auto at0 = v;
  r.apply(at0.data(), 1, 4, 0);
  CHECK(at0 == v);
  // inv_freq = [1, 1/100]; pairs are (x0, x2) and (x1, x3) in the half-split layout.
  auto at1 = v;
  r.apply(at1.data(), 1, 4, 1);
  const double c0 = std::cos(1.0), s0 = std::sin(1.0), c1 = std::cos(0.01), s1 = std::sin(0.01);
  CHECK(at1[0] == Approx(1 * c0 - 3 * s0));
  CHECK(at1[2] == Approx(3 * c0 + 1 * s0));
  CHECK(at1[1] == Approx(2 * c1 - 4 * s1));
  CHECK(at1[3] == Approx(4 * c1 + 2 * s1));
  auto far = v;
  r.apply(far.data(), 1, 4, 1234);
  double n0 = 0, n1 = 0;
  for (int i = 0; i < 4; ++i) {
    n0 += v[static_cast<size_t>(i)] * v[static_cast<size_t>(i)];
    n1 += far[static_cast<size_t>(i)] * far[static_cast<size_t>(i)];
  }
  CHECK(n1 == Approx(n0));
}

TEST_CASE("rope: relative positions — q·k depends only on the distance", "[kernels]") {
  rope_config cfg;
  rope_table r(cfg, 8);
  auto q = random_vec(8, 5), k = random_vec(8, 6);
  auto dot_at = [&](int64_t pq, int64_t pk) {
    auto a = q, b = k;
    r.apply(a.data(), 1, 8, pq);
    r.apply(b.data(), 1, 8, pk);
    double s = 0;
    for (int i = 0; i < 8; ++i) s += a[static_cast<size_t>(i)] * b[static_cast<size_t>(i)];
    return s;
  };
  CHECK(dot_at(10, 7) == Approx(dot_at(103, 100)).epsilon(1e-4));
}

TEST_CASE("rope: linear scaling divides the frequencies", "[kernels]") {
  rope_config a, b;
  b.type = "linear";
  b.factor = 4;
  rope_table ra(a, 8), rb(b, 8);
  for (size_t i = 0; i < 4; ++i) CHECK(rb.inv_freq()[i] == Approx(ra.inv_freq()[i] / 4));
}

TEST_CASE("swiglu: the vectorised path equals silu(g)·u", "[kernels]") {
  const int64_t f = 203;  // a scalar tail too
  auto gu = random_vec(static_cast<size_t>(2 * f), 11, 30.0f);  // reaches deep into both tails of exp
  gu[0] = -100.0f;
  gu[1] = 100.0f;
  std::vector<float> out(static_cast<size_t>(f));
  swiglu(gu.data(), 1, f, out.data());
  for (int64_t i = 0; i < f; ++i) {
    const double g = gu[static_cast<size_t>(i)], u = gu[static_cast<size_t>(f + i)];
    const double want = g / (1 + std::exp(-g)) * u;
    CHECK(out[static_cast<size_t>(i)] == Approx(want).epsilon(1e-6).margin(1e-30));
  }
}

TEST_CASE("fp8 e4m3: every finite code round-trips, rounding is to nearest, overflow saturates", "[kernels]") {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) {
      CHECK(std::isnan(f8e4m3_to_f32(static_cast<uint8_t>(c))));
      continue;
    }
    const float v = f8e4m3_to_f32(static_cast<uint8_t>(c));
    if (c == 0x80) continue;  // -0 encodes as +0's sign-flipped twin; both decode to zero
    CHECK(f32_to_f8e4m3(v) == c);
  }
  CHECK(f8e4m3_to_f32(0x7e) == 448.0f);
  CHECK(f32_to_f8e4m3(1e6f) == 0x7e);
  CHECK(f32_to_f8e4m3(-1e6f) == 0xfe);
  CHECK(f8e4m3_to_f32(0x01) == std::ldexp(1.0f, -9));  // smallest subnormal
  CHECK(f8e4m3_to_f32(f32_to_f8e4m3(1.0f + 1.0f / 16)) == 1.0f);         // halfway between 1 and 1.125: to even
  CHECK(f8e4m3_to_f32(f32_to_f8e4m3(1.0f + 3.0f / 16)) == 1.25f);        // halfway between 1.125 and 1.25: to even
}
