#include "model/sampler.hpp"
#include "test_util.hpp"

#include <map>

using namespace sy::model;

TEST_CASE("sampler: temperature 0 is greedy", "[sampler]") {
  sampler s({});
  std::vector<float> l{0.1f, 3.0f, -1.0f, 2.9f};
  CHECK(s.sample(l) == 1);
}

TEST_CASE("sampler: the same seed gives the same tokens, another seed other ones", "[sampler]") {
  std::vector<float> l(50);
  for (size_t i = 0; i < l.size(); ++i) l[i] = static_cast<float>(i % 7) * 0.3f;
  auto draw = [&](uint64_t seed) {
    sampler s({1.0, 0, 1.0, seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.sample(l));
    return out;
  };
  CHECK(draw(42) == draw(42));
  CHECK(draw(42) != draw(43));
}

TEST_CASE("sampler: top-k 1 and a tiny top-p reduce to greedy", "[sampler]") {
  std::vector<float> l{0.5f, 0.4f, 2.0f, 1.9f};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    sampler k1({1.0, 1, 1.0, seed});
    CHECK(k1.sample(l) == 2);
    sampler p({1.0, 0, 1e-6, seed});
    CHECK(p.sample(l) == 2);
  }
}

TEST_CASE("sampler: frequencies follow the softmax", "[sampler]") {
  std::vector<float> l{0.0f, std::log(3.0f)};  // p = .25, .75
  sampler s({1.0, 0, 1.0, 7});
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += s.sample(l) == 1;
  CHECK(static_cast<double>(ones) / n == Approx(0.75).margin(0.02));
}

TEST_CASE("sampler: top-p keeps the smallest set reaching the mass", "[sampler]") {
  std::vector<float> l{std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  std::map<int, int> seen;
  sampler s({1.0, 0, 0.75, 3});  // 0.5 + 0.3 ≥ 0.75: tokens 0 and 1 only
  for (int i = 0; i < 2000; ++i) ++seen[s.sample(l)];
  CHECK(seen.count(2) == 0);
  CHECK(seen[0] > 0);
  CHECK(seen[1] > 0);
}

TEST_CASE("sampler: invalid parameters are named", "[sampler]") {
  CHECK_THAT(describe(validate({-1.0, 0, 1.0, 0})), Catch::Contains("temperature"));
  CHECK_THAT(describe(validate({1.0, -2, 1.0, 0})), Catch::Contains("top_k"));
  CHECK_THAT(describe(validate({1.0, 0, 0.0, 0})), Catch::Contains("top_p"));
  CHECK_THAT(describe(validate({1.0, 0, std::nan(""), 0})), Catch::Contains("top_p"));
  CHECK_FALSE(validate({0.7, 40, 0.9, 1}));
}
