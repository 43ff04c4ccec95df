#include "model/generate.hpp"
#include "model/make_model.hpp"
#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace sy::model;
using sy::test::temp_dir;

TEST_CASE("make-model → load → generate, for every family and both dtypes", "[make_model]") {
  for (auto fam : {family_id::mixtral, family_id::qwen2_moe, family_id::qwen3_moe, family_id::olmoe}) {
    for (auto dt : {dtype::f32, dtype::bf16}) {
      INFO(family_name(fam) << " " << dtype_name(dt));
      temp_dir tmp;
      make_model_options o;
      o.family = fam;
      o.hidden = 64;
      o.ffn = 32;
      o.experts = 4;
      o.top_k = 2;
      o.layers = 2;
      o.vocab = 96;
      o.weight_dtype = dt;
      o.shard_bytes = 64 << 10;  // forces several shards and an index
      REQUIRE_FALSE(make_model(tmp.path, o));
      CHECK(std::filesystem::exists(tmp.path / "model.safetensors.index.json"));
      int shards = 0;
      for (auto& e : std::filesystem::directory_iterator(tmp.path)) shards += e.path().extension() == ".safetensors";
      CHECK(shards > 1);
      auto w = load_model(tmp.path);
      REQUIRE(w);
      CHECK((*w)->config.family == fam);
      CHECK((*w)->experts[1].experts[3]->gate_up.type() == dt);
      local_expert_executor ex(&(*w)->experts);
      decoder d(**w, ex);
      generate_options g;
      g.max_new_tokens = 4;
      g.stop_at_eos = false;
      auto out = generate(d, {{1, 2, 3}, {4, 5}}, g);
      REQUIRE(out);
      CHECK(out->ids[0].size() == 7);
      CHECK(out->ids[1].size() == 6);
      // Same seed, same weights: a second checkpoint is byte-identical.
      if (fam == family_id::mixtral && dt == dtype::bf16) {
        temp_dir again;
        REQUIRE_FALSE(make_model(again.path, o));
        auto w2 = load_model(again.path);
        REQUIRE(w2);
        local_expert_executor ex2(&(*w2)->experts);
        decoder d2(**w2, ex2);
        auto out2 = generate(d2, {{1, 2, 3}, {4, 5}}, g);
        REQUIRE(out2);
        CHECK(out2->ids == out->ids);
      }
    }
  }
}

namespace {

/// Copies a fixture so a test can damage it.
std::filesystem::path copy_fixture(const std::string& name, const std::filesystem::path& dst) {
  std::filesystem::copy(sy::test::fixture(name), dst, std::filesystem::copy_options::recursive);
  for (auto& e : std::filesystem::directory_iterator(dst))
    std::filesystem::permissions(e.path(), std::filesystem::perms::owner_write, std::filesystem::perm_options::add);
  return dst;
}

void edit_config(const std::filesystem::path& dir, const std::function<void(nlohmann::json&)>& f) {
  nlohmann::json j;
  {
    std::ifstream in(dir / "config.json");
    j = nlohmann::json::parse(in);
  }
  f(j);
  std::ofstream(dir / "config.json") << j.dump(2);
}

sy::test::run_result cli(const std::string& args) { return sy::test::run(sy::test::binary() + " " + args); }

}  // namespace

TEST_CASE("CLI: bad checkpoints end with one clear message naming the file and the key", "[cli]") {
  temp_dir tmp;
  auto model = copy_fixture("mixtral_e8k2", tmp.path / "m");
  const std::string input = (sy::test::fixture("mixtral_e8k2") / "reference.safetensors").string();
  const std::string args = "logits --model " + model.string() + " --input " + input + " --output " + (tmp.path / "o.st").string();

  SECTION("a tensor the config implies is missing") {
    edit_config(model, [](auto& j) { j["num_hidden_layers"] = 3; });
    auto r = cli(args);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("missing tensor 'model.layers.2.input_layernorm.weight'") &&
                             Catch::Contains(model.string()));
  }
  SECTION("a tensor of the wrong shape") {
    edit_config(model, [](auto& j) { j["intermediate_size"] = 100; });
    auto r = cli(args);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("model.safetensors") && Catch::Contains("w1.weight") &&
                             Catch::Contains("[96, 64]") && Catch::Contains("[100, 64]"));
  }
  SECTION("an unknown architecture") {
    edit_config(model, [](auto& j) { j["model_type"] = "llama"; });
    auto r = cli(args);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("config.json") && Catch::Contains("model_type") && Catch::Contains("llama"));
  }
  SECTION("an unsupported config value") {
    edit_config(model, [](auto& j) { j["rope_parameters"]["rope_type"] = "longrope"; });
    auto r = cli(args);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("rope_parameters.rope_type") && Catch::Contains("longrope"));
  }
  SECTION("a truncated weights file") {
    std::filesystem::resize_file(model / "model.safetensors", 100000);
    auto r = cli(args);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("model.safetensors") && Catch::Contains("truncated"));
  }
  SECTION("an input file without input_ids") {
    auto r = cli("logits --model " + model.string() + " --input " + (model / "model.safetensors").string() +
                 " --output " + (tmp.path / "o.st").string());
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("missing tensor 'input_ids'"));
  }
  SECTION("a malformed --prompt-ids") {
    auto r = cli("generate --model " + model.string() + " --prompt-ids 3,x,4");
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains("--prompt-ids") && Catch::Contains("'x'"));
  }
}

TEST_CASE("CLI: logits and generate write what transformers wrote", "[cli]") {
  temp_dir tmp;
  const auto dir = sy::test::fixture("qwen2moe_e8k2_shared");
  const auto ref = (dir / "reference.safetensors").string();
  auto r = cli("generate --model " + dir.string() + " --input " + ref + " --max-new-tokens 8 --ignore-eos --output " +
               (tmp.path / "g.st").string());
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("prompt 1:"));
  auto out = safetensors_file::open(tmp.path / "g.st");
  auto want = safetensors_file::open(ref);
  REQUIRE(out);
  REQUIRE(want);
  CHECK(*read_i64(*(*out)->find("greedy_ids")) == *read_i64(*(*want)->find("greedy_ids")));
  CHECK(sy::test::rel_error(*read_f32(*(*out)->find("greedy_step_logits")), *read_f32(*(*want)->find("greedy_step_logits"))) < 1e-4);

  r = cli("logits --model " + dir.string() + " --input " + ref + " --output " + (tmp.path / "l.st").string());
  REQUIRE(r.status == 0);
  auto lo = safetensors_file::open(tmp.path / "l.st");
  REQUIRE(lo);
  CHECK((*lo)->find("logits")->shape == std::vector<int64_t>{2, 12, 512});
  CHECK(sy::test::rel_error(*read_f32(*(*lo)->find("logits")), *read_f32(*(*want)->find("logits"))) < 1e-4);

  r = cli("inspect " + dir.string());
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("qwen2_moe") && Catch::Contains("8 routed, top-2"));
}
