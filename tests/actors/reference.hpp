#pragma once
// The fixture models' transformers references and a helper that generates through an embedded
// cluster, shared by the cluster tests (CPU) and the GPU cluster test.
#include "actors/embedded_cluster.hpp"
#include "model/safetensors.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

namespace sy::test {

/// The test data folder: $SY_TEST_DATA when set (binaries carried to another machine, such as the
/// GPU one, where the checkout lives elsewhere), else the source tree's, fixed at build time.
inline std::filesystem::path test_data() {
  if (const char* e = std::getenv("SY_TEST_DATA"); e != nullptr && *e != '\0') return e;
  return SY_TEST_DATA;
}

inline std::filesystem::path fixture(const std::string& name) { return test_data() / "hf-tiny" / name; }

struct reference {
  std::vector<std::vector<int32_t>> prompts, greedy;  ///< greedy: the new tokens only
};

inline reference read_reference(const std::string& name) {
  auto f = model::safetensors_file::open(fixture(name) / "reference.safetensors");
  REQUIRE(f);
  auto ids = *model::read_i64(*(*f)->find("input_ids"));
  auto greedy = *model::read_i64(*(*f)->find("greedy_ids"));
  const auto t = (*f)->find("input_ids")->shape[1], g = (*f)->find("greedy_ids")->shape[1];
  reference r;
  for (int64_t b = 0; b < (*f)->find("input_ids")->shape[0]; ++b) {
    r.prompts.emplace_back(ids.begin() + b * t, ids.begin() + (b + 1) * t);
    r.greedy.emplace_back(greedy.begin() + b * g + t, greedy.begin() + (b + 1) * g);
  }
  return r;
}

/// Submits and waits for every prompt (greedy, no EOS stop), in one batch.
inline std::vector<scheduler::completion> generate(actors::embedded_cluster& c, const std::vector<std::vector<int32_t>>& prompts,
                                            int max_tokens, int logprobs = -1) {
  std::vector<std::promise<scheduler::completion>> ps(prompts.size());
  std::vector<std::future<scheduler::completion>> fs;
  for (auto& p : ps) fs.push_back(p.get_future());
  for (size_t i = 0; i < prompts.size(); ++i) {
    scheduler::generation_request r;
    r.id = i;
    r.prompt = prompts[i];
    r.max_tokens = max_tokens;
    r.stop_at_eos = false;
    r.logprobs = logprobs;
    r.on_done = [&ps, i](scheduler::completion c) { ps[i].set_value(std::move(c)); };
    REQUIRE_FALSE(c.submit(std::move(r)));
  }
  std::vector<scheduler::completion> out;
  for (auto& f : fs) {
    REQUIRE(f.wait_for(std::chrono::seconds(60)) == std::future_status::ready);
    out.push_back(f.get());
  }
  return out;
}

}  // namespace sy::test
