#include "model/config.hpp"
#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace sy::model;
using json = nlohmann::json;

namespace {

json fixture_json(const std::string& name) {
  std::ifstream in(sy::test::fixture(name) / "config.json");
  return json::parse(in);
}

std::string rejection(const json& j) {
  auto c = parse_config(j.dump(), "cfg.json");
  REQUIRE_FALSE(c);
  return describe(c.error());
}

}  // namespace

TEST_CASE("config: the fixtures' families and the fields that change the math", "[config]") {
  auto mix = load_config(sy::test::fixture("mixtral_e8k2"));
  REQUIRE(mix);
  CHECK(mix->family == family_id::mixtral);
  CHECK(mix->gating.num_experts == 8);
  CHECK(mix->gating.top_k == 2);
  CHECK(mix->gating.norm_topk_prob);
  CHECK(mix->head_dim == 16);
  CHECK(mix->num_kv_heads == 2);
  CHECK(mix->moe_intermediate_size == 96);
  CHECK(mix->rope.theta == 10000.0);
  CHECK(mix->eos_token_ids == std::vector<int64_t>{2});

  auto q2 = load_config(sy::test::fixture("qwen2moe_e8k2_shared"));
  REQUIRE(q2);
  CHECK(q2->family == family_id::qwen2_moe);
  CHECK_FALSE(q2->gating.norm_topk_prob);
  CHECK(q2->qkv_bias);
  CHECK(q2->shared_expert_intermediate_size == 64);
  CHECK(q2->shared_expert_gate);
  CHECK(q2->moe_intermediate_size == 32);

  auto q3 = load_config(sy::test::fixture("qwen3moe_e16k4"));
  REQUIRE(q3);
  CHECK(q3->family == family_id::qwen3_moe);
  CHECK(q3->qk_norm == qk_norm_kind::per_head);
  CHECK(q3->head_dim == 16);
  CHECK(q3->gating.num_experts == 16);  // transformers 5 writes num_local_experts here
  CHECK(q3->gating.norm_topk_prob);
}

TEST_CASE("config: rope theta at the top level or inside rope_parameters", "[config]") {
  json j = fixture_json("mixtral_e8k2");
  j.erase("rope_parameters");
  j["rope_theta"] = 1e6;
  auto c = parse_config(j.dump(), "cfg.json");
  REQUIRE(c);
  CHECK(c->rope.theta == 1e6);
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  c = parse_config(j.dump(), "cfg.json");
  REQUIRE(c);
  CHECK(c->rope.type == "linear");
  CHECK(c->rope.factor == 2.0);
  j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  CHECK_THAT(rejection(j), Catch::Contains("rope_scaling.rope_type") && Catch::Contains("dynamic"));
}

TEST_CASE("config: sparse and dense layers from decoder_sparse_step and mlp_only_layers", "[config]") {
  json j = fixture_json("qwen2moe_e8k2_shared");
  j["num_hidden_layers"] = 4;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  auto c = parse_config(j.dump(), "cfg.json");
  REQUIRE(c);
  CHECK(c->moe_layer == std::vector<bool>{false, true, false, false});
}

TEST_CASE("config: OLMoE normalises q and k over the whole projection", "[config]") {
  json j = fixture_json("qwen3moe_e16k4");
  j["model_type"] = "olmoe";
  j.erase("head_dim");
  j["clip_qkv"] = 8.0;
  j["num_experts"] = 16;
  j.erase("num_local_experts");
  j.erase("norm_topk_prob");  // OLMoE's default is false
  auto c = parse_config(j.dump(), "cfg.json");
  REQUIRE(c);
  CHECK(c->family == family_id::olmoe);
  CHECK(c->qk_norm == qk_norm_kind::whole);
  CHECK(c->moe_intermediate_size == c->intermediate_size);
  CHECK_FALSE(c->gating.norm_topk_prob);
  REQUIRE(c->clip_qkv);
  CHECK(*c->clip_qkv == 8.0);
}

TEST_CASE("config: bad values name the file and the key", "[config]") {
  json base = fixture_json("mixtral_e8k2");
  SECTION("unknown architecture") {
    json j = base;
    j["model_type"] = "gpt2";
    CHECK_THAT(rejection(j), Catch::Contains("cfg.json") && Catch::Contains("model_type") && Catch::Contains("gpt2"));
  }
  SECTION("missing key") {
    json j = base;
    j.erase("hidden_size");
    CHECK_THAT(rejection(j), Catch::Contains("missing key 'hidden_size'"));
  }
  SECTION("wrong type") {
    json j = base;
    j["num_attention_heads"] = "four";
    CHECK_THAT(rejection(j), Catch::Contains("'num_attention_heads' must be an integer"));
  }
  SECTION("top-k above the expert count") {
    json j = base;
    j["num_experts_per_tok"] = 9;
    CHECK_THAT(rejection(j), Catch::Contains("num_experts_per_tok"));
  }
  SECTION("heads not divisible by kv heads") {
    json j = base;
    j["num_key_value_heads"] = 3;
    CHECK_THAT(rejection(j), Catch::Contains("num_key_value_heads"));
  }
  SECTION("unsupported activation") {
    json j = base;
    j["hidden_act"] = "gelu";
    CHECK_THAT(rejection(j), Catch::Contains("hidden_act"));
  }
  SECTION("not JSON") {
    auto c = parse_config("{oops", "cfg.json");
    REQUIRE_FALSE(c);
    CHECK_THAT(describe(c.error()), Catch::Contains("cfg.json: not well-formed JSON"));
  }
  SECTION("a folder without config.json") {
    sy::test::temp_dir tmp;
    auto c = load_config(tmp.path);
    REQUIRE_FALSE(c);
    CHECK_THAT(describe(c.error()), Catch::Contains("config.json"));
  }
}
