// The embedded cluster with its expert hosts on the GPU (`--device cuda:0`): the same actors and
// the same answers as on the CPU, within what bf16 weights on the device allow.
#include "actors/embedded_cluster.hpp"
#include "model/cuda/gpu_moe.hpp"
#include "tests/actors/reference.hpp"

#include <catch2/catch.hpp>

#include <algorithm>

using namespace sy;

namespace {

/// The fixtures hold f32 weights; the device holds bf16. A greedy continuation must equal
/// transformers' up to its first difference, and a difference is allowed only where the two
/// candidates are a near tie under the device's own log-probabilities (after it the contexts
/// differ, so nothing later is compared). Returns how many tokens matched.
size_t check_continuation(const scheduler::completion& got, const std::vector<int32_t>& want) {
  REQUIRE(got.finish_reason == "length");
  REQUIRE(got.tokens.size() == want.size());
  REQUIRE(got.top_logprobs.size() == want.size());
  size_t i = 0;
  while (i < want.size() && got.tokens[i] == want[i]) ++i;
  if (i < want.size()) {
    const auto& top = got.top_logprobs[i];
    auto it = std::find_if(top.begin(), top.end(), [&](const auto& p) { return p.first == want[i]; });
    INFO("first difference at token " << i << ": device chose " << got.tokens[i] << ", transformers " << want[i]);
    REQUIRE(it != top.end());
    CHECK(got.token_logprobs[i] - it->second < 0.05f);
  }
  return i;
}

}  // namespace

TEST_CASE("gpu: an embedded cluster whose expert hosts compute on the GPU answers transformers' greedy tokens", "[gpu]") {
  for (auto name : {"mixtral_e8k2", "qwen3moe_e16k4", "deepseekv3_e16k4"}) {
    INFO(name);
    actors::embedded_config cfg;
    cfg.model = test::fixture(name);
    cfg.hosts = 2;
    cfg.make_device = [] { return model::cuda::make_device_experts(0); };
    auto c = actors::embedded_cluster::start(cfg);
    REQUIRE(c);
    REQUIRE((*c)->wait_ready(std::chrono::seconds(60)));
    const auto ref = test::read_reference(name);
    const int n = static_cast<int>(ref.greedy[0].size());
    // Batched and one by one: the GEMV path (few rows) and the GEMM paths (prefill) both run.
    auto out = test::generate(**c, ref.prompts, n, 2);
    size_t matched = 0, total = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      matched += check_continuation(out[i], ref.greedy[i]);
      total += ref.greedy[i].size();
    }
    auto one = test::generate(**c, {ref.prompts[0]}, n, 2);
    matched += check_continuation(one[0], ref.greedy[0]);
    total += ref.greedy[0].size();
    WARN(name << ": " << matched << " of " << total << " tokens equal transformers' before any near-tie difference");
  }
}
