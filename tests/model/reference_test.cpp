// The model runtime against Hugging Face transformers' own outputs (tests/data/hf-tiny).
#include "model/generate.hpp"
#include "model/weights.hpp"
#include "test_util.hpp"

using namespace sy::model;

namespace {

struct reference {
  std::vector<std::vector<int32_t>> input_ids;
  std::vector<float> logits, moe_in, moe_out, step_logits;
  std::vector<int64_t> greedy_ids;
  int64_t batch = 0, tokens = 0, new_tokens = 0;
};

reference read_reference(const std::filesystem::path& dir) {
  auto f = safetensors_file::open(dir / "reference.safetensors");
  REQUIRE(f);
  reference r;
  const auto* ids = (*f)->find("input_ids");
  REQUIRE(ids);
  r.batch = ids->shape[0];
  r.tokens = ids->shape[1];
  auto v = *read_i64(*ids);
  r.input_ids.resize(static_cast<size_t>(r.batch));
  for (int64_t b = 0; b < r.batch; ++b)
    for (int64_t t = 0; t < r.tokens; ++t) r.input_ids[static_cast<size_t>(b)].push_back(static_cast<int32_t>(v[static_cast<size_t>(b * r.tokens + t)]));
  r.logits = *read_f32(*(*f)->find("logits"));
  r.moe_in = *read_f32(*(*f)->find("moe_block_in"));
  r.moe_out = *read_f32(*(*f)->find("moe_block_out"));
  r.step_logits = *read_f32(*(*f)->find("greedy_step_logits"));
  r.greedy_ids = *read_i64(*(*f)->find("greedy_ids"));
  r.new_tokens = (*f)->find("greedy_step_logits")->shape[1];
  return r;
}

std::vector<float> flatten(const std::vector<std::vector<float>>& v) {
  std::vector<float> out;
  for (auto& x : v) out.insert(out.end(), x.begin(), x.end());
  return out;
}

void check_against_reference(const std::string& name) {
  const auto dir = sy::test::fixture(name);
  auto w = load_model(dir);
  REQUIRE(w);
  const auto& cfg = (*w)->config;
  auto ref = read_reference(dir);
  local_expert_executor ex(&(*w)->experts);
  decoder d(**w, ex);

  // Logits for every prompt position, no cache reuse.
  auto logits = prompt_logits(d, ref.input_ids);
  REQUIRE(logits);
  const double logits_err = sy::test::rel_error(flatten(*logits), ref.logits);
  INFO(name << " logits error " << logits_err);
  CHECK(logits_err < 1e-4);

  // The first sparse MoE block alone, from the reference's own input.
  int first_sparse = 0;
  while (!cfg.moe_layer[static_cast<size_t>(first_sparse)]) ++first_sparse;
  const int64_t rows = ref.batch * ref.tokens;
  std::vector<float> moe_out(static_cast<size_t>(rows * cfg.hidden_size));
  REQUIRE_FALSE(d.moe_block(first_sparse, ref.moe_in.data(), rows, moe_out.data()));
  const double moe_err = sy::test::rel_error(moe_out, ref.moe_out);
  INFO(name << " MoE block (layer " << first_sparse << ") error " << moe_err);
  CHECK(moe_err < 1e-4);

  // Greedy generation with the KV cache, both prompts in one batch.
  generate_options opts;
  opts.max_new_tokens = static_cast<int>(ref.new_tokens);
  opts.stop_at_eos = false;
  opts.keep_logits = true;
  auto g = generate(d, ref.input_ids, opts);
  REQUIRE(g);
  std::vector<int64_t> ids;
  for (auto& s : g->ids) ids.insert(ids.end(), s.begin(), s.end());
  CHECK(ids == ref.greedy_ids);
  const double step_err = sy::test::rel_error(flatten(g->step_logits), ref.step_logits);
  INFO(name << " greedy step logits error " << step_err);
  CHECK(step_err < 1e-4);

  // One prompt at a time gives the same tokens as the batch.
  for (size_t b = 0; b < ref.input_ids.size(); ++b) {
    auto one = generate(d, {ref.input_ids[b]}, opts);
    REQUIRE(one);
    CHECK(one->ids[0] == g->ids[b]);
  }

  // Decoding with the cache equals recomputing the whole sequence without it.
  for (size_t b = 0; b < g->ids.size(); ++b) {
    std::vector<int32_t> seq(g->ids[b].begin(), g->ids[b].end() - 1);
    auto full = prompt_logits(d, {seq});
    REQUIRE(full);
    const size_t v = static_cast<size_t>(cfg.vocab_size);
    std::vector<float> tail(full->at(0).end() - static_cast<std::ptrdiff_t>(static_cast<size_t>(ref.new_tokens) * v), full->at(0).end());
    CHECK(sy::test::rel_error(g->step_logits[b], tail) < 1e-5);
  }
}

}  // namespace

TEST_CASE("reference: Mixtral (softmax top-2 renormalised, GQA) matches transformers", "[reference]") {
  check_against_reference("mixtral_e8k2");
}

TEST_CASE("reference: Qwen2-MoE (no renormalisation, gated shared expert, qkv bias) matches transformers", "[reference]") {
  check_against_reference("qwen2moe_e8k2_shared");
}

TEST_CASE("reference: Qwen3-MoE (per-head q/k norm, 16 experts top-4) matches transformers", "[reference]") {
  check_against_reference("qwen3moe_e16k4");
}

TEST_CASE("reference: DeepSeek-V3 (MLA with q LoRA, dense first layer, sigmoid group-limited routing, shared expert) matches transformers", "[reference][deepseek]") {
  check_against_reference("deepseekv3_e16k4");
}

TEST_CASE("reference: DeepSeek-V3 with YaRN rope scaling matches transformers", "[reference][deepseek]") {
  check_against_reference("deepseekv3_yarn_e16k4");
}

TEST_CASE("reference: a bf16 copy of the weights stays close to the f32 reference", "[reference]") {
  const auto dir = sy::test::fixture("mixtral_e8k2");
  load_options o;
  o.weight_dtype = dtype::bf16;
  auto w = load_model(dir, o);
  REQUIRE(w);
  auto ref = read_reference(dir);
  local_expert_executor ex(&(*w)->experts);
  decoder d(**w, ex);
  auto logits = prompt_logits(d, ref.input_ids);
  REQUIRE(logits);
  const double err = sy::test::rel_error(flatten(*logits), ref.logits);
  CHECK(err < 2e-2);
  CHECK(err > 1e-7);  // the weights really were rounded
}

TEST_CASE("decoder: out-of-vocabulary ids are refused and leave the cache untouched", "[reference]") {
  auto w = load_model(sy::test::fixture("mixtral_e8k2"));
  REQUIRE(w);
  local_expert_executor ex(&(*w)->experts);
  decoder d(**w, ex);
  kv_cache cache;
  std::vector<int32_t> bad{1, 2, 100000};
  std::vector<float> logits;
  std::vector<sequence_step> steps{{&cache, bad, false, &logits}};
  auto e = d.step(steps);
  REQUIRE(e);
  CHECK_THAT(describe(e), Catch::Contains("100000"));
  CHECK(cache.length == 0);
}

TEST_CASE("decoder: a missing expert fails the step and rolls the caches back", "[reference]") {
  auto w = load_model(sy::test::fixture("qwen3moe_e16k4"));
  REQUIRE(w);
  for (auto& e : (*w)->experts[1].experts) e.reset();  // layer 1 loses its experts
  local_expert_executor ex(&(*w)->experts);
  decoder d(**w, ex);
  kv_cache cache;
  std::vector<int32_t> prompt(40);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(i * 7 % 500);
  std::vector<float> logits;
  std::vector<sequence_step> steps{{&cache, prompt, false, &logits}};
  auto e = d.step(steps);
  REQUIRE(e);
  CHECK_THAT(describe(e), Catch::Contains("layer 1") && Catch::Contains("not held"));
  CHECK(cache.length == 0);
  for (auto& layer : cache.a) CHECK(layer.empty());
}
