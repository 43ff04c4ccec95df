#include "model/make_model.hpp"

#include "model/family.hpp"

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

namespace sy::model {

namespace {

using json = nlohmann::json;

struct planned_tensor {
  std::string name;
  std::vector<int64_t> shape;
  dtype type;
  enum class fill { random, ones, zeros } how = fill::random;
  float scale = 0.02f;
  bool scale_of_previous = false;  ///< the F32 weight_scale_inv of the FP8 tensor before it
  std::vector<int> hot = {};       ///< elements set to `hot_value` (a skewed gate bias)
  float hot_value = 0;
  size_t bytes() const {
    size_t n = dtype_size(type);
    for (auto d : shape) n *= static_cast<size_t>(d);
    return n;
  }
};

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t name_hash(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

/// Uniform values with standard deviation `scale`, reproducible per (tensor name, chunk).
void fill_chunk(const planned_tensor& t, uint64_t seed, size_t first, size_t count, std::byte* out) {
  const size_t es = dtype_size(t.type);
  if (t.how != planned_tensor::fill::random) {
    const float v = t.how == planned_tensor::fill::ones ? 1.0f : 0.0f;
    for (size_t i = 0; i < count; ++i) {
      if (t.type == dtype::f32) std::memcpy(out + i * 4, &v, 4);
      else {
        uint16_t b = f32_to_bf16(v);
        std::memcpy(out + i * 2, &b, 2);
      }
    }
    return;
  }
  uint64_t s = name_hash(t.name, seed) ^ (first * 0x2545f4914f6cdd1dull);
  const float a = t.scale * std::sqrt(3.0f);
  for (size_t i = 0; i < count; ++i) {
    const float u = static_cast<float>(splitmix(s) >> 40) * (1.0f / 16777216.0f);  // [0,1)
    float v = (2 * u - 1) * a;
    for (int k : t.hot)
      if (static_cast<size_t>(k) == first + i) v = t.hot_value;
    if (es == 4) {
      std::memcpy(out + i * 4, &v, 4);
    } else if (t.type == dtype::bf16) {
      uint16_t b = f32_to_bf16(v);
      std::memcpy(out + i * 2, &b, 2);
    } else if (t.type == dtype::f16) {
      uint16_t b = f32_to_f16(v);
      std::memcpy(out + i * 2, &b, 2);
    }
  }
}

std::vector<planned_tensor> plan(const make_model_options& o, const model_config& c) {
  std::vector<planned_tensor> t;
  const bool fp8 = o.weight_dtype == dtype::f8_e4m3;
  const dtype wd = fp8 ? dtype::bf16 : o.weight_dtype;  // unquantised matrices (embeddings, head, router)
  const dtype nd = wd == dtype::f32 ? dtype::f32 : dtype::bf16;  // norms, biases
  const int64_t h = c.hidden_size;
  tensor_names n(c);
  auto mat = [&](std::string name, int64_t r, int64_t col) { t.push_back({std::move(name), {r, col}, wd}); };
  // Linear weights that DeepSeek's FP8 checkpoints quantise, each followed by its block scales.
  auto qmat = [&](std::string name, int64_t r, int64_t col) {
    if (!fp8) return mat(std::move(name), r, col);
    t.push_back({name, {r, col}, dtype::f8_e4m3});
    planned_tensor s{name + "_scale_inv", {(r + 127) / 128, (col + 127) / 128}, dtype::f32};
    s.scale_of_previous = true;
    t.push_back(std::move(s));
  };
  auto ones = [&](std::string name, int64_t len) {
    t.push_back({std::move(name), {len}, nd, planned_tensor::fill::ones});
  };
  auto vecr = [&](std::string name, int64_t len, float scale = 0.02f) {
    t.push_back({std::move(name), {len}, nd, planned_tensor::fill::random, scale});
  };
  mat("model.embed_tokens.weight", c.vocab_size, h);
  for (int l = 0; l < c.num_layers; ++l) {
    ones(n.layer(l) + "input_layernorm.weight", h);
    ones(n.layer(l) + "post_attention_layernorm.weight", h);
    if (c.attention == attention_kind::mla) {
      const int64_t qhd = c.qk_nope_head_dim + c.qk_rope_head_dim;
      if (c.q_lora_rank > 0) {
        qmat(n.attn(l, "q_a_proj.weight"), c.q_lora_rank, h);
        ones(n.attn(l, "q_a_layernorm.weight"), c.q_lora_rank);
        qmat(n.attn(l, "q_b_proj.weight"), c.num_heads * qhd, c.q_lora_rank);
      } else {
        qmat(n.attn(l, "q_proj.weight"), c.num_heads * qhd, h);
      }
      qmat(n.attn(l, "kv_a_proj_with_mqa.weight"), c.kv_lora_rank + c.qk_rope_head_dim, h);
      ones(n.attn(l, "kv_a_layernorm.weight"), c.kv_lora_rank);
      qmat(n.attn(l, "kv_b_proj.weight"), c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
      qmat(n.attn(l, "o_proj.weight"), h, c.num_heads * c.v_head_dim);
    } else {
      const int64_t qd = c.num_heads * c.head_dim, kd = c.num_kv_heads * c.head_dim;
      mat(n.attn(l, "q_proj.weight"), qd, h);
      mat(n.attn(l, "k_proj.weight"), kd, h);
      mat(n.attn(l, "v_proj.weight"), kd, h);
      mat(n.attn(l, "o_proj.weight"), h, qd);
      if (c.qkv_bias) {
        vecr(n.attn(l, "q_proj.bias"), qd);
        vecr(n.attn(l, "k_proj.bias"), kd);
        vecr(n.attn(l, "v_proj.bias"), kd);
      }
      if (c.qk_norm == qk_norm_kind::per_head) {
        ones(n.attn(l, "q_norm.weight"), c.head_dim);
        ones(n.attn(l, "k_norm.weight"), c.head_dim);
      } else if (c.qk_norm == qk_norm_kind::whole) {
        ones(n.attn(l, "q_norm.weight"), qd);
        ones(n.attn(l, "k_norm.weight"), kd);
      }
    }
    const auto& s = n.spec;
    if (!c.moe_layer[static_cast<size_t>(l)]) {
      qmat(n.dense(l, s.dense_gate), c.intermediate_size, h);
      qmat(n.dense(l, s.dense_up), c.intermediate_size, h);
      qmat(n.dense(l, s.dense_down), h, c.intermediate_size);
      continue;
    }
    t.push_back({n.moe(l, s.router + ".weight"), {c.gating.num_experts, h}, wd});
    if (c.gating.has_score_bias)
    {
      t.push_back({n.moe(l, s.router + ".e_score_correction_bias"), {c.gating.num_experts}, dtype::f32,
                   planned_tensor::fill::random, 0.05f});
      t.back().hot = o.hot_experts;
      t.back().hot_value = o.hot_bias;
    }
    for (int e = 0; e < c.gating.num_experts; ++e) {
      qmat(n.expert(l, e, s.expert_gate), c.moe_intermediate_size, h);
      qmat(n.expert(l, e, s.expert_up), c.moe_intermediate_size, h);
      qmat(n.expert(l, e, s.expert_down), h, c.moe_intermediate_size);
    }
    if (c.shared_expert_intermediate_size > 0) {
      qmat(n.shared(l, s.dense_gate), c.shared_expert_intermediate_size, h);
      qmat(n.shared(l, s.dense_up), c.shared_expert_intermediate_size, h);
      qmat(n.shared(l, s.dense_down), h, c.shared_expert_intermediate_size);
      if (c.shared_expert_gate) mat(n.moe(l, s.shared_gate + ".weight"), 1, h);
    }
  }
  ones("model.norm.weight", h);
  mat("lm_head.weight", c.vocab_size, h);
  return t;
}

/// The random values of a whole tensor as f32, identical to what `fill_chunk` writes piece by piece.
std::vector<float> tensor_values(const planned_tensor& t, uint64_t seed) {
  planned_tensor f32 = t;
  f32.type = dtype::f32;
  size_t n = 1;
  for (auto d : t.shape) n *= static_cast<size_t>(d);
  std::vector<float> v(n);
  constexpr size_t piece = size_t{1} << 18;
  const int64_t pieces = static_cast<int64_t>((n + piece - 1) / piece);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pieces; ++p) {
    const size_t a = static_cast<size_t>(p) * piece;
    fill_chunk(f32, seed, a, std::min(piece, n - a), reinterpret_cast<std::byte*>(v.data() + a));
  }
  return v;
}

/// e4m3 codes and 128×128 block scales (scale_inv = amax / 448, so W ≈ code · scale_inv).
void quantize_fp8(const std::vector<float>& v, int64_t rows, int64_t cols, std::vector<std::byte>& codes,
                  std::vector<std::byte>& scales) {
  const int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
  std::vector<float> s(static_cast<size_t>(sr * sc), 0.0f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float& m = s[static_cast<size_t>((i / 128) * sc + j / 128)];
      m = std::max(m, std::fabs(v[static_cast<size_t>(i * cols + j)]));
    }
  for (auto& m : s) m = m > 0 ? m / 448.0f : 1.0f;
  codes.resize(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      codes[static_cast<size_t>(i * cols + j)] = static_cast<std::byte>(
          f32_to_f8e4m3(v[static_cast<size_t>(i * cols + j)] / s[static_cast<size_t>((i / 128) * sc + j / 128)]));
  scales.resize(s.size() * 4);
  std::memcpy(scales.data(), s.data(), scales.size());
}

json config_json(const make_model_options& o, int heads, int kv_heads, int64_t dense_ffn, int64_t shared_ffn) {
  (void)shared_ffn;
  json j;
  j["hidden_size"] = o.hidden;
  j["num_hidden_layers"] = o.layers;
  j["num_attention_heads"] = heads;
  j["num_key_value_heads"] = kv_heads;
  j["num_experts_per_tok"] = o.top_k;
  j["vocab_size"] = o.vocab;
  j["max_position_embeddings"] = 4096;
  j["rms_norm_eps"] = 1e-6;
  j["rope_theta"] = 1000000.0;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = false;
  j["torch_dtype"] = o.weight_dtype == dtype::f32 ? "float32" : "bfloat16";
  j["bos_token_id"] = 1;
  j["eos_token_id"] = 2;
  switch (o.family) {
    case family_id::mixtral:
      j["architectures"] = {"MixtralForCausalLM"};
      j["model_type"] = "mixtral";
      j["intermediate_size"] = o.ffn;
      j["num_local_experts"] = o.experts;
      j["sliding_window"] = nullptr;
      break;
    case family_id::qwen2_moe:
      j["architectures"] = {"Qwen2MoeForCausalLM"};
      j["model_type"] = "qwen2_moe";
      j["intermediate_size"] = dense_ffn;
      j["moe_intermediate_size"] = o.ffn;
      j["shared_expert_intermediate_size"] = shared_ffn;
      j["num_experts"] = o.experts;
      j["norm_topk_prob"] = false;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = json::array();
      j["use_sliding_window"] = false;
      break;
    case family_id::qwen3_moe:
      j["architectures"] = {"Qwen3MoeForCausalLM"};
      j["model_type"] = "qwen3_moe";
      j["intermediate_size"] = dense_ffn;
      j["moe_intermediate_size"] = o.ffn;
      j["num_experts"] = o.experts;
      j["head_dim"] = o.hidden / heads;
      j["norm_topk_prob"] = true;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = json::array();
      j["attention_bias"] = false;
      break;
    case family_id::deepseek_v2:
    case family_id::deepseek_v3: {
      const bool v3 = o.family == family_id::deepseek_v3;
      j["architectures"] = {v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"};
      j["model_type"] = v3 ? "deepseek_v3" : "deepseek_v2";
      j["intermediate_size"] = dense_ffn;
      j["moe_intermediate_size"] = o.ffn;
      j["n_routed_experts"] = o.experts;
      j["n_shared_experts"] = o.shared_experts >= 0 ? o.shared_experts : (v3 ? 1 : 2);
      j["num_key_value_heads"] = heads;
      const int64_t qlr = o.q_lora_rank >= 0 ? o.q_lora_rank : (v3 ? std::max<int64_t>(32, o.hidden / 4) : 0);
      j["q_lora_rank"] = qlr > 0 ? json(qlr) : json(nullptr);
      j["kv_lora_rank"] = o.kv_lora_rank > 0 ? o.kv_lora_rank : std::max<int64_t>(16, o.hidden / 8);
      j["qk_nope_head_dim"] = o.qk_nope_dim > 0 ? o.qk_nope_dim : 32;
      j["qk_rope_head_dim"] = o.qk_rope_dim > 0 ? o.qk_rope_dim : 16;
      j["v_head_dim"] = o.v_head_dim > 0 ? o.v_head_dim : 32;
      j["n_group"] = o.groups;
      j["topk_group"] = o.topk_groups;
      j["first_k_dense_replace"] = o.first_dense >= 0 ? o.first_dense : 1;
      j["moe_layer_freq"] = 1;
      j["norm_topk_prob"] = v3;
      j["routed_scaling_factor"] = v3 ? 2.5 : 1.0;
      j["scoring_func"] = v3 ? "sigmoid" : "softmax";
      j["topk_method"] = v3 ? "noaux_tc" : (o.groups > 1 ? "group_limited_greedy" : "greedy");
      if (v3) j["rope_interleave"] = true;
      if (o.weight_dtype == dtype::f8_e4m3)
        j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                    {"weight_block_size", {128, 128}}};
      break;
    }
    case family_id::olmoe:
      j["architectures"] = {"OlmoeForCausalLM"};
      j["model_type"] = "olmoe";
      j["intermediate_size"] = o.ffn;
      j["num_experts"] = o.experts;
      j["norm_topk_prob"] = false;
      j["clip_qkv"] = nullptr;
      j["attention_bias"] = false;
      break;
    default: break;
  }
  return j;
}

}  // namespace

caf::error make_model(const std::filesystem::path& dir, const make_model_options& o) {
  namespace fs = std::filesystem;
  const bool deepseek = o.family == family_id::deepseek_v2 || o.family == family_id::deepseek_v3;
  if (o.hidden <= 0 || o.ffn <= 0 || o.layers <= 0 || o.experts <= 0 || o.vocab <= 0)
    return make_error(model_errc::invalid_argument, "make-model: sizes must be positive");
  if (o.top_k <= 0 || o.top_k > o.experts)
    return make_error(model_errc::invalid_argument, "make-model: --top-k must be in [1, --experts]");
  if (o.weight_dtype != dtype::bf16 && o.weight_dtype != dtype::f32 && !(deepseek && o.weight_dtype == dtype::f8_e4m3))
    return make_error(model_errc::invalid_argument, "make-model: --dtype must be bf16 or f32 (fp8 for the DeepSeek families)");
  const int heads = o.heads > 0 ? o.heads : std::max<int>(1, static_cast<int>(o.hidden / 64));
  const int kv = o.kv_heads > 0 ? o.kv_heads : std::max(1, heads / 4);
  if (!deepseek && (o.hidden % heads != 0 || heads % kv != 0 || (o.hidden / heads) % 2 != 0))
    return make_error(model_errc::invalid_argument,
                      "make-model: --hidden must split into an even head size over the heads, and kv heads must divide heads");
  const int64_t dense_ffn = o.dense_ffn > 0 ? o.dense_ffn : 4 * o.ffn;
  const int64_t shared_ffn = o.shared_ffn >= 0 ? o.shared_ffn : (o.family == family_id::qwen2_moe ? 4 * o.ffn : 0);
  if (deepseek && (o.groups < 1 || o.experts % o.groups != 0 || o.topk_groups < 1 || o.topk_groups > o.groups))
    return make_error(model_errc::invalid_argument, "make-model: --groups must divide --experts and --topk-groups be in [1, --groups]");
  json cj = config_json(o, heads, kv, dense_ffn, shared_ffn);
  auto cfg = parse_config(cj.dump(), "make-model config");
  if (!cfg) return cfg.error();

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return make_error(model_errc::io_error, dir.string() + ": cannot create: " + ec.message());
  {
    std::ofstream out(dir / "config.json");
    out << cj.dump(2) << "\n";
    std::ofstream gen(dir / "generation_config.json");
    gen << json{{"bos_token_id", 1}, {"eos_token_id", 2}}.dump(2) << "\n";
    if (!out || !gen) return make_error(model_errc::io_error, dir.string() + ": cannot write config files");
  }

  auto tensors = plan(o, *cfg);
  size_t total = 0;
  for (auto& t : tensors) total += t.bytes();
  // Group tensors into shards of about shard_bytes each.
  std::vector<std::vector<size_t>> shards(1);
  size_t cur = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (cur > 0 && cur + tensors[i].bytes() > static_cast<size_t>(o.shard_bytes)) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += tensors[i].bytes();
  }
  json weight_map = json::object();
  size_t done = 0;
  std::vector<std::byte> buf, pending_scales;
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    json h = json::object();
    h["__metadata__"] = {{"format", "pt"}};
    uint64_t off = 0;
    for (auto i : shards[s]) {
      auto& t = tensors[i];
      h[t.name] = {{"dtype", dtype_name(t.type)}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes()}}};
      off += t.bytes();
      weight_map[t.name] = name;
    }
    std::string header = h.dump();
    while ((header.size() + 8) % 8) header.push_back(' ');
    auto path = dir / name;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) return make_error(model_errc::io_error, path.string() + ": cannot open for writing");
    uint64_t len = header.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (auto i : shards[s]) {
      auto& t = tensors[i];
      if (t.type == dtype::f8_e4m3 || t.scale_of_previous) {
        // FP8 weight and its scales: quantise the whole tensor at once, keep the scales for next.
        if (t.type == dtype::f8_e4m3) quantize_fp8(tensor_values(t, o.seed), t.shape[0], t.shape[1], buf, pending_scales);
        const auto& bytes = t.type == dtype::f8_e4m3 ? buf : pending_scales;
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
        done += bytes.size();
        if (o.progress) o.progress(done, total);
        continue;
      }
      const size_t es = dtype_size(t.type), n = t.bytes() / es;
      constexpr size_t chunk = size_t{1} << 22;
      for (size_t first = 0; first < n; first += chunk) {
        const size_t count = std::min(chunk, n - first);
        buf.resize(count * es);
        // Split further so both cores generate; each piece seeds from its own offset.
        constexpr size_t piece = size_t{1} << 18;
        const int64_t pieces = static_cast<int64_t>((count + piece - 1) / piece);
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < pieces; ++p) {
          const size_t a = static_cast<size_t>(p) * piece, c = std::min(piece, count - a);
          fill_chunk(t, o.seed, first + a, c, buf.data() + a * es);
        }
        out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
        done += buf.size();
        if (o.progress) o.progress(done, total);
      }
    }
    if (!out) return make_error(model_errc::io_error, path.string() + ": write failed (disk full?)");
  }
  std::ofstream idx(dir / "model.safetensors.index.json");
  idx << json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) << "\n";
  if (!idx) return make_error(model_errc::io_error, (dir / "model.safetensors.index.json").string() + ": write failed");
  return {};
}

}  // namespace sy::model
