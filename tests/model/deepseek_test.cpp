#include "model/decoder.hpp"
#include "model/generate.hpp"
#include "model/make_model.hpp"
#include "model/weights.hpp"
#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace sy::model;
using sy::test::temp_dir;

TEST_CASE("deepseek: V2-Lite-style config (no q LoRA, softmax greedy, always-interleaved rope)", "[deepseek]") {
  nlohmann::json j = {{"model_type", "deepseek_v2"}, {"vocab_size", 100}, {"hidden_size", 64}, {"num_hidden_layers", 3},
                      {"num_attention_heads", 4}, {"intermediate_size", 128}, {"moe_intermediate_size", 32},
                      {"n_routed_experts", 8}, {"n_shared_experts", 2}, {"num_experts_per_tok", 2},
                      {"q_lora_rank", nullptr}, {"kv_lora_rank", 16}, {"qk_nope_head_dim", 16}, {"qk_rope_head_dim", 8},
                      {"v_head_dim", 16}, {"first_k_dense_replace", 1}, {"moe_layer_freq", 1}, {"topk_method", "greedy"},
                      {"n_group", 1}, {"topk_group", 1}, {"norm_topk_prob", false}, {"routed_scaling_factor", 1.0},
                      {"rope_interleave", false},
                      {"rope_scaling", {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096},
                                        {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707}}}};
  auto c = parse_config(j.dump(), "v2.json");
  REQUIRE(c);
  CHECK(c->family == family_id::deepseek_v2);
  CHECK(c->attention == attention_kind::mla);
  CHECK(c->q_lora_rank == 0);
  CHECK(c->gating.scoring == scoring_func::softmax);
  CHECK(c->gating.method == topk_method::greedy);
  CHECK(c->gating.scale_only_unnormalised);
  CHECK(c->rope.interleave);  // V2's modeling ignores rope_interleave
  CHECK(c->shared_expert_intermediate_size == 64);
  CHECK(c->moe_layer == std::vector<bool>{false, true, true});
  CHECK(c->rope.type == "yarn");
  CHECK(c->rope.attention_factor() == Approx(1.0));  // mscale == mscale_all_dim
  auto cache = cache_bytes_per_token(*c);
  CHECK(cache.stored == (16 + 8) * 4);
  CHECK(cache.expanded == 4 * (16 + 8 + 16) * 4);
}

TEST_CASE("deepseek: make-model writes V2 and V3 checkpoints that load and generate", "[deepseek][make_model]") {
  for (auto fam : {family_id::deepseek_v2, family_id::deepseek_v3}) {
    INFO(family_name(fam));
    temp_dir tmp;
    make_model_options o;
    o.family = fam;
    o.hidden = 96;
    o.ffn = 32;
    o.experts = 8;
    o.top_k = 2;
    o.layers = 3;
    o.groups = 4;
    o.topk_groups = 2;
    o.vocab = 64;
    REQUIRE_FALSE(make_model(tmp.path, o));
    auto w = load_model(tmp.path);
    REQUIRE(w);
    CHECK((*w)->config.attention == attention_kind::mla);
    CHECK((*w)->config.q_lora_rank == (fam == family_id::deepseek_v3 ? 32 : 0));
    local_expert_executor ex(&(*w)->experts);
    decoder d(**w, ex);
    generate_options g;
    g.max_new_tokens = 6;
    g.stop_at_eos = false;
    g.keep_logits = true;
    auto out = generate(d, {{3, 4, 5, 6}}, g);
    REQUIRE(out);
    // The compressed-cache decode equals recomputing the whole sequence without a cache.
    std::vector<int32_t> seq(out->ids[0].begin(), out->ids[0].end() - 1);
    auto full = prompt_logits(d, {seq});
    REQUIRE(full);
    std::vector<float> tail(full->at(0).end() - 6 * 64, full->at(0).end());
    CHECK(sy::test::rel_error(out->step_logits[0], tail) < 1e-5);
  }
}

TEST_CASE("deepseek: FP8 block-quantised weights dequantise to the same weights written in bf16", "[deepseek][fp8]") {
  temp_dir bf, f8;
  make_model_options o;
  o.family = family_id::deepseek_v3;
  o.hidden = 160;  // not a multiple of 128: ragged scale blocks
  o.ffn = 200;
  o.experts = 4;
  o.top_k = 2;
  o.layers = 2;
  o.vocab = 64;
  o.seed = 5;
  REQUIRE_FALSE(make_model(bf.path, o));
  o.weight_dtype = dtype::f8_e4m3;
  REQUIRE_FALSE(make_model(f8.path, o));
  auto ckpt = checkpoint::open(f8.path);
  REQUIRE(ckpt);
  auto q = ckpt->find("model.layers.1.mlp.experts.2.down_proj.weight");
  REQUIRE(q);
  CHECK(q->type == dtype::f8_e4m3);
  auto s = ckpt->find("model.layers.1.mlp.experts.2.down_proj.weight_scale_inv");
  REQUIRE(s);
  CHECK(s->shape == std::vector<int64_t>{2, 2});  // ceil(160/128) × ceil(200/128)
  CHECK(ckpt->find("model.layers.1.mlp.gate.weight")->type == dtype::bf16);  // the router stays unquantised

  load_options lo;
  lo.weight_dtype = dtype::f32;
  auto wb = load_model(bf.path, lo);
  auto wq = load_model(f8.path, lo);
  REQUIRE(wb);
  REQUIRE(wq);
  auto cmp = [](const matrix& a, const matrix& b) {
    auto x = a.to_f32(), y = b.to_f32();
    REQUIRE(x.size() == y.size());
    double amax = 0;
    for (float v : y) amax = std::max(amax, static_cast<double>(std::fabs(v)));
    size_t bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      // e4m3 keeps 3 mantissa bits (half an ulp: 1/16 relative); bf16 rounding and the block's
      // subnormal step (amax/448 · 2^-9) add a little.
      const double tol = std::fabs(y[i]) / 16 + std::fabs(y[i]) / 256 + amax / 448 / 512 + 1e-12;
      bad += std::fabs(x[i] - y[i]) > tol;
    }
    return bad;
  };
  const auto& eb = *(*wb)->experts[1].experts[2];
  const auto& eq = *(*wq)->experts[1].experts[2];
  CHECK(cmp(eq.gate_up, eb.gate_up) == 0);
  CHECK(cmp(eq.down, eb.down) == 0);
  CHECK(eq.down.to_f32() != eb.down.to_f32());  // the FP8 copy really is quantised
  CHECK(cmp((*wq)->layers[0].attn.kv_b, (*wb)->layers[0].attn.kv_b) == 0);
  CHECK((*wq)->layers[1].moe.router.to_f32() == (*wb)->layers[1].moe.router.to_f32());

  // And the model still answers sensibly: logits close to the bf16 model's.
  local_expert_executor exb(&(*wb)->experts), exq(&(*wq)->experts);
  decoder db(**wb, exb), dq(**wq, exq);
  auto lb = prompt_logits(db, {{1, 2, 3, 4, 5}});
  auto lq = prompt_logits(dq, {{1, 2, 3, 4, 5}});
  REQUIRE(lb);
  REQUIRE(lq);
  CHECK(sy::test::rel_error(lq->at(0), lb->at(0)) < 0.1);
}

TEST_CASE("deepseek: multi-token-prediction layers are skipped with one notice", "[deepseek]") {
  temp_dir tmp;
  const auto src = sy::test::fixture("deepseekv3_e16k4");
  std::filesystem::copy_file(src / "config.json", tmp.path / "config.json");
  std::filesystem::copy_file(src / "model.safetensors", tmp.path / "model-1.safetensors");
  REQUIRE_FALSE(write_safetensors(tmp.path / "model-2.safetensors",
                                  {tensor_out::f32("model.layers.3.eh_proj.weight", {64, 128}, std::vector<float>(64 * 128)),
                                   tensor_out::f32("model.layers.3.enorm.weight", {64}, std::vector<float>(64))}));
  auto base = checkpoint::open(src);
  REQUIRE(base);
  nlohmann::json map;
  for (auto& n : base->names()) map[n] = "model-1.safetensors";
  map["model.layers.3.eh_proj.weight"] = "model-2.safetensors";
  map["model.layers.3.enorm.weight"] = "model-2.safetensors";
  std::ofstream(tmp.path / "model.safetensors.index.json") << nlohmann::json{{"weight_map", map}}.dump();
  std::vector<std::string> notes;
  load_options o;
  o.notice = [&](const std::string& n) { notes.push_back(n); };
  auto w = load_model(tmp.path, o);
  REQUIRE(w);
  REQUIRE(notes.size() == 1);
  CHECK_THAT(notes[0], Catch::Contains("skipping 2 tensors") && Catch::Contains("model.layers.3"));
}
