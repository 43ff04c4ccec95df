#include "model/safetensors.hpp"
#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

using namespace sy::model;
using sy::test::temp_dir;
using json = nlohmann::json;

namespace {

std::vector<std::byte> image(const std::string& header, size_t data_bytes, int64_t declared_len = -1) {
  std::vector<std::byte> out(8 + header.size() + data_bytes);
  uint64_t len = declared_len < 0 ? header.size() : static_cast<uint64_t>(declared_len);
  std::memcpy(out.data(), &len, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

std::string rejection(std::vector<std::byte> img) {
  auto f = safetensors_file::parse(std::move(img), "test.safetensors");
  REQUIRE_FALSE(f);
  return describe(f.error());
}

}  // namespace

TEST_CASE("safetensors: a valid image parses and exposes its tensors", "[safetensors]") {
  auto img = image(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                   R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}})", 32);
  auto f = safetensors_file::parse(img, "ok.safetensors");
  REQUIRE(f);
  REQUIRE((*f)->tensors().size() == 2);
  CHECK((*f)->find("a")->shape == std::vector<int64_t>{2, 3});
  CHECK((*f)->find("b")->type == dtype::bf16);
  CHECK((*f)->metadata().at("format") == "pt");
}

TEST_CASE("safetensors: corrupt headers are rejected, each with its reason", "[safetensors]") {
  SECTION("shorter than the length prefix") {
    CHECK_THAT(rejection(std::vector<std::byte>(5)), Catch::Contains("too short"));
  }
  SECTION("header length past the end") {
    CHECK_THAT(rejection(image("{}", 0, 1000)), Catch::Contains("runs past the end"));
  }
  SECTION("absurd header length") {
    CHECK_THAT(rejection(image("{}", 0, int64_t{1} << 40)), Catch::Contains("exceeds"));
  }
  SECTION("malformed JSON") {
    CHECK_THAT(rejection(image(R"({"a": {"dtype": )", 0)), Catch::Contains("not well-formed JSON"));
  }
  SECTION("header not an object") {
    CHECK_THAT(rejection(image("[1,2]", 0)), Catch::Contains("not a JSON object"));
  }
  SECTION("unknown dtype") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("unknown dtype 'F33'"));
  }
  SECTION("missing data_offsets") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F32","shape":[1]}})", 4)), Catch::Contains("data_offsets"));
  }
  SECTION("negative shape") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("non-negative"));
  }
  SECTION("offsets beyond the data section") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8)),
               Catch::Contains("beyond the data section"));
  }
  SECTION("byte count differs from dtype size x shape") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
               Catch::Contains("needs 12"));
  }
  SECTION("begin after end") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 8)),
               Catch::Contains("begin > end"));
  }
  SECTION("overlapping tensors") {
    CHECK_THAT(rejection(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                               12)),
               Catch::Contains("overlap"));
  }
  SECTION("metadata values must be strings") {
    CHECK_THAT(rejection(image(R"({"__metadata__":{"x":1}})", 0)), Catch::Contains("__metadata__.x"));
  }
}

TEST_CASE("safetensors: write, reopen, and convert F32/BF16/F16 to f32", "[safetensors]") {
  temp_dir tmp;
  std::vector<float> v{1.0f, -2.5f, 0.15625f, 3e-3f};
  tensor_out bf{"bf", dtype::bf16, {4}, {}}, hf{"hf", dtype::f16, {4}, {}};
  for (float x : v) {
    uint16_t b = f32_to_bf16(x), h = f32_to_f16(x);
    bf.bytes.insert(bf.bytes.end(), reinterpret_cast<std::byte*>(&b), reinterpret_cast<std::byte*>(&b) + 2);
    hf.bytes.insert(hf.bytes.end(), reinterpret_cast<std::byte*>(&h), reinterpret_cast<std::byte*>(&h) + 2);
  }
  auto path = tmp.path / "t.safetensors";
  REQUIRE_FALSE(write_safetensors(path, {tensor_out::f32("f", {2, 2}, v), bf, hf,
                                         tensor_out::i64("ids", {3}, {7, 8, 9})}));
  auto f = safetensors_file::open(path);
  REQUIRE(f);
  CHECK(*read_f32(*(*f)->find("f")) == v);
  auto b = *read_f32(*(*f)->find("bf"));
  auto h = *read_f32(*(*f)->find("hf"));
  for (size_t i = 0; i < v.size(); ++i) {
    CHECK(b[i] == Approx(v[i]).epsilon(1e-2));
    CHECK(h[i] == Approx(v[i]).epsilon(1e-3));
  }
  CHECK(*read_i64(*(*f)->find("ids")) == std::vector<int64_t>{7, 8, 9});
  CHECK_FALSE(read_f32(*(*f)->find("ids")));  // integers are not weights
}

TEST_CASE("safetensors: a truncated checkpoint file is reported, not mapped past its end", "[safetensors]") {
  temp_dir tmp;
  auto src = sy::test::fixture("mixtral_e8k2") / "model.safetensors";
  auto dst = tmp.path / "model.safetensors";
  std::filesystem::copy_file(src, dst);
  std::filesystem::resize_file(dst, std::filesystem::file_size(src) / 2);
  auto f = safetensors_file::open(dst);
  REQUIRE_FALSE(f);
  CHECK_THAT(describe(f.error()), Catch::Contains("truncated") && Catch::Contains(dst.string()));
}

TEST_CASE("checkpoint: sharded folders resolve through model.safetensors.index.json", "[safetensors]") {
  temp_dir tmp;
  REQUIRE_FALSE(write_safetensors(tmp.path / "s1.safetensors", {tensor_out::f32("a", {2}, {1, 2})}));
  REQUIRE_FALSE(write_safetensors(tmp.path / "s2.safetensors", {tensor_out::f32("b", {1}, {3})}));
  {
    std::ofstream idx(tmp.path / "model.safetensors.index.json");
    idx << json{{"weight_map", {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}}}.dump();
  }
  auto c = checkpoint::open(tmp.path);
  REQUIRE(c);
  CHECK(c->find("a"));
  CHECK(c->find("b"));
  auto missing = c->get("c");
  REQUIRE_FALSE(missing);
  CHECK_THAT(describe(missing.error()), Catch::Contains("missing tensor 'c'"));
  auto wrong = c->get("a", {3});
  REQUIRE_FALSE(wrong);
  CHECK_THAT(describe(wrong.error()), Catch::Contains("[2]") && Catch::Contains("[3]"));

  SECTION("a shard listed in the index but absent") {
    std::ofstream idx(tmp.path / "model.safetensors.index.json");
    idx << json{{"weight_map", {{"a", "s1.safetensors"}, {"b", "gone.safetensors"}}}}.dump();
    idx.close();
    auto c2 = checkpoint::open(tmp.path);
    REQUIRE_FALSE(c2);
    CHECK_THAT(describe(c2.error()), Catch::Contains("gone.safetensors"));
  }
  SECTION("an index naming a path outside the folder") {
    std::ofstream idx(tmp.path / "model.safetensors.index.json");
    idx << json{{"weight_map", {{"a", "../etc/passwd"}}}}.dump();
    idx.close();
    auto c2 = checkpoint::open(tmp.path);
    REQUIRE_FALSE(c2);
    CHECK_THAT(describe(c2.error()), Catch::Contains("outside the folder"));
  }
  SECTION("the same tensor in two shards") {
    REQUIRE_FALSE(write_safetensors(tmp.path / "s2.safetensors", {tensor_out::f32("a", {2}, {1, 2})}));
    auto c2 = checkpoint::open(tmp.path);
    REQUIRE_FALSE(c2);
    CHECK_THAT(describe(c2.error()), Catch::Contains("appears in both"));
  }
}
