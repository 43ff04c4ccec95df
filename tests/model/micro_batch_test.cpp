// Ping-pong micro-batches in the decoder: a step split in two halves, one half's attention running
// while the other's expert batches are away, gives the same logits as the step in one piece, and
// really overlaps (both halves' batches of a layer are out before the first comes back).
#include "model/decoder.hpp"
#include "model/weights.hpp"
#include "test_util.hpp"

#include <chrono>
#include <future>
#include <mutex>
#include <thread>

using namespace sy::model;

namespace {

/// Runs the local experts on another thread after a short delay, as a network would: `start`
/// returns at once. Records every start and finish.
class async_executor final : public expert_executor {
 public:
  explicit async_executor(const std::vector<layer_experts>* layers) : local_(layers) {}
  struct event {
    bool start;
    int layer;
    int64_t rows;
  };
  std::mutex mu;
  std::vector<event> events;

  caf::error run(int layer, const dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                 std::vector<std::vector<float>>& outputs) override {
    return finish(start(layer, plan, inputs, outputs));
  }
  std::unique_ptr<ticket> start(int layer, const dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                                std::vector<std::vector<float>>& outputs) override {
    {
      std::lock_guard lock(mu);
      events.push_back({true, layer, plan.tokens});
    }
    auto t = std::make_unique<flight>();
    t->layer = layer;
    t->result = std::async(std::launch::async, [this, layer, &plan, &inputs, &outputs] {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      return local_.run(layer, plan, inputs, outputs);
    });
    return t;
  }
  caf::error finish(std::unique_ptr<ticket> t) override {
    auto* f = dynamic_cast<flight*>(t.get());
    REQUIRE(f);
    auto e = f->result.get();
    std::lock_guard lock(mu);
    events.push_back({false, f->layer, 0});
    return e;
  }
  bool overlaps() const override { return true; }

 private:
  struct flight final : ticket {
    int layer = 0;
    std::future<caf::error> result;
  };
  local_expert_executor local_;
};

/// Three prompts of different lengths, then `decode` greedy steps of all three together; returns
/// every step's logits (last position of each sequence), flattened.
std::vector<float> run_steps(decoder& d, int decode) {
  const int64_t vocab = d.config().vocab_size;
  std::vector<std::vector<int32_t>> prompts{{1, 5, 9, 200, 3}, {7, 7, 8}, {300, 2, 11, 12, 13, 14, 90}};
  for (auto& p : prompts)
    for (auto& t : p) t = static_cast<int32_t>(t % vocab);
  std::vector<kv_cache> caches(prompts.size());
  std::vector<std::vector<float>> logits(prompts.size());
  std::vector<float> all;
  std::vector<std::vector<int32_t>> next = prompts;
  for (int s = 0; s <= decode; ++s) {
    std::vector<sequence_step> steps;
    for (size_t i = 0; i < prompts.size(); ++i) steps.push_back({&caches[i], next[i], false, &logits[i]});
    auto e = d.step(steps);
    REQUIRE_FALSE(e);
    for (size_t i = 0; i < prompts.size(); ++i) {
      all.insert(all.end(), logits[i].begin(), logits[i].end());
      next[i] = {static_cast<int32_t>(std::max_element(logits[i].begin(), logits[i].end()) - logits[i].begin())};
    }
  }
  return all;
}

}  // namespace

TEST_CASE("decoder: two micro-batches in ping-pong give the logits of one batch, and overlap", "[model]") {
  for (auto name : {"mixtral_e8k2", "qwen2moe_e8k2_shared", "qwen3moe_e16k4", "deepseekv3_e16k4"}) {
    INFO(name);
    auto w = load_model(sy::test::fixture(name));
    REQUIRE(w);
    local_expert_executor local(&(*w)->experts);
    decoder one(**w, local);
    const auto want = run_steps(one, 3);

    async_executor async(&(*w)->experts);
    decoder two(**w, async);
    two.set_micro_batches(2);
    const auto got = run_steps(two, 3);
    // The same rows through the same experts; only the grouping of rows into GEMMs differs.
    CHECK(sy::test::rel_error(got, want) < 1e-5);

    // Every MoE layer of every step: both halves' batches were sent before the first came back.
    const auto& cfg = (*w)->config;
    int moe_layers = 0;
    for (bool m : cfg.moe_layer) moe_layers += m;
    size_t starts = 0, finishes = 0, overlapped = 0;
    int in_flight = 0;
    for (const auto& ev : async.events) {
      if (ev.start) {
        ++starts;
        if (++in_flight == 2) ++overlapped;
      } else {
        ++finishes;
        --in_flight;
      }
    }
    CHECK(starts == finishes);
    CHECK(starts == static_cast<size_t>(2 * moe_layers * 4));  // two halves, 4 steps
    CHECK(overlapped >= static_cast<size_t>(moe_layers * 4));  // and again across layer boundaries
  }
}

TEST_CASE("decoder: a step of one sequence is not split", "[model]") {
  auto w = load_model(sy::test::fixture("qwen3moe_e16k4"));
  REQUIRE(w);
  async_executor async(&(*w)->experts);
  decoder d(**w, async);
  d.set_micro_batches(2);
  kv_cache cache;
  std::vector<int32_t> prompt{1, 2, 3, 4};
  std::vector<float> logits;
  std::vector<sequence_step> steps{{&cache, prompt, false, &logits}};
  REQUIRE_FALSE(d.step(steps));
  for (const auto& ev : async.events)
    if (ev.start) CHECK(ev.rows == 4);
}

TEST_CASE("decoder: a step is split only when each half has at least the minimum rows", "[model]") {
  auto w = load_model(sy::test::fixture("qwen3moe_e16k4"));
  REQUIRE(w);
  const int64_t vocab = (*w)->config.vocab_size;
  struct want {
    std::vector<int> lengths;  // rows of each sequence in the step
    std::vector<int64_t> halves;  // the rows of each expert batch of a layer
  };
  // Minimum 4 rows per half: 10 + 1 + 1 balances best as 10 | 2, too small a half, so one piece;
  // 5 + 6 splits as 5 | 6; 3 + 2 + 3 (8 rows, enough in all) balances as 3 | 5: one piece;
  // 4 + 4 + 4 + 4 as 8 | 8.
  for (const auto& c : std::vector<want>{{{10, 1, 1}, {12}}, {{5, 6}, {5, 6}}, {{3, 2, 3}, {8}}, {{4, 4, 4, 4}, {8, 8}}}) {
    INFO("rows " << c.lengths.size() << " sequences, first " << c.lengths[0]);
    async_executor async(&(*w)->experts);
    decoder d(**w, async);
    d.set_micro_batches(2, 4);
    std::vector<kv_cache> caches(c.lengths.size());
    std::vector<std::vector<int32_t>> prompts;
    std::vector<std::vector<float>> logits(c.lengths.size());
    std::vector<sequence_step> steps;
    for (size_t i = 0; i < c.lengths.size(); ++i) {
      prompts.emplace_back();
      for (int j = 0; j < c.lengths[i]; ++j) prompts.back().push_back(static_cast<int32_t>((7 * i + 3 * j + 1) % vocab));
    }
    for (size_t i = 0; i < c.lengths.size(); ++i) steps.push_back({&caches[i], prompts[i], false, &logits[i]});
    REQUIRE_FALSE(d.step(steps));
    std::vector<int64_t> first_layer;
    for (const auto& ev : async.events)
      if (ev.start && ev.layer == async.events.front().layer) first_layer.push_back(ev.rows);
    CHECK(first_layer == c.halves);
  }
}

TEST_CASE("decoder: a failing half fails the step, finishes the other half's batches and rolls back every cache", "[model]") {
  auto w = load_model(sy::test::fixture("qwen3moe_e16k4"));
  REQUIRE(w);
  for (auto& e : (*w)->experts[1].experts) e.reset();  // layer 1 loses its experts
  async_executor async(&(*w)->experts);
  decoder d(**w, async);
  d.set_micro_batches(2);
  std::vector<kv_cache> caches(3);
  std::vector<std::vector<int32_t>> prompts{{1, 2, 3}, {4, 5, 6, 7}, {8, 9}};
  std::vector<std::vector<float>> logits(3);
  std::vector<sequence_step> steps;
  for (size_t i = 0; i < 3; ++i) steps.push_back({&caches[i], prompts[i], false, &logits[i]});
  auto e = d.step(steps);
  REQUIRE(e);
  CHECK_THAT(describe(e), Catch::Contains("layer 1"));
  size_t starts = 0, finishes = 0;
  for (const auto& ev : async.events) (ev.start ? starts : finishes)++;
  CHECK(starts == finishes);
  CHECK(starts >= 2);
  for (auto& c : caches) {
    CHECK(c.length == 0);
    for (auto& layer : c.a) CHECK(layer.empty());
  }
}
