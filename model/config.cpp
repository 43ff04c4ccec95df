#include "model/config.hpp"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace sy::model {

namespace {

using json = nlohmann::json;

/// Reads typed keys out of one JSON object; every error names the file and the key.
class reader {
 public:
  reader(const json& j, std::string source, std::string prefix = "")
      : j_(j), source_(std::move(source)), prefix_(std::move(prefix)) {}

  [[nodiscard]] bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  [[nodiscard]] const json& raw(const char* key) const { return j_.at(key); }
  [[nodiscard]] caf::error error() const { return err_; }

  caf::error bad(const std::string& key, const std::string& what) const {
    return make_error(model_errc::bad_value, source_ + ": key '" + prefix_ + key + "' " + what);
  }
  caf::error missing(const std::string& key) const {
    return make_error(model_errc::missing_key, source_ + ": missing key '" + prefix_ + key + "'");
  }

  /// The first present key of `keys` as an integer in [lo, hi]; `fallback` when none is present,
  /// an error when none is present and there is no fallback.
  int64_t integer(std::initializer_list<const char*> keys, std::optional<int64_t> fallback, int64_t lo = 0,
                  int64_t hi = int64_t{1} << 40) {
    for (auto k : keys) {
      if (!has(k)) continue;
      const auto& v = j_.at(k);
      if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>())) {
        set(bad(k, "must be an integer, got " + v.dump()));
        return 0;
      }
      int64_t x = v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(v.get<double>());
      if (x < lo || x > hi) {
        set(bad(k, "is " + std::to_string(x) + ", outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"));
        return 0;
      }
      return x;
    }
    if (!fallback) {
      set(missing(*keys.begin()));
      return 0;
    }
    return *fallback;
  }

  double number(std::initializer_list<const char*> keys, std::optional<double> fallback) {
    for (auto k : keys) {
      if (!has(k)) continue;
      const auto& v = j_.at(k);
      if (!v.is_number()) {
        set(bad(k, "must be a number, got " + v.dump()));
        return 0;
      }
      double x = v.get<double>();
      if (!std::isfinite(x)) {
        set(bad(k, "must be finite"));
        return 0;
      }
      return x;
    }
    if (!fallback) {
      set(missing(*keys.begin()));
      return 0;
    }
    return *fallback;
  }

  bool boolean(const char* key, bool fallback) {
    if (!has(key)) return fallback;
    const auto& v = j_.at(key);
    if (!v.is_boolean()) {
      set(bad(key, "must be true or false, got " + v.dump()));
      return fallback;
    }
    return v.get<bool>();
  }

  std::string string(const char* key, std::optional<std::string> fallback) {
    if (!has(key)) {
      if (!fallback) set(missing(key));
      return fallback.value_or("");
    }
    const auto& v = j_.at(key);
    if (!v.is_string()) {
      set(bad(key, "must be a string, got " + v.dump()));
      return "";
    }
    return v.get<std::string>();
  }

  std::vector<int64_t> int_list(const char* key) {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    const auto& v = j_.at(key);
    if (v.is_number_integer()) return {v.get<int64_t>()};
    if (!v.is_array()) {
      set(bad(key, "must be an integer or a list of integers"));
      return out;
    }
    for (auto& e : v) {
      if (!e.is_number_integer()) {
        set(bad(key, "must hold integers only"));
        return {};
      }
      out.push_back(e.get<int64_t>());
    }
    return out;
  }

  void set(caf::error e) {
    if (!err_) err_ = std::move(e);
  }

 private:
  const json& j_;
  std::string source_;
  std::string prefix_;
  caf::error err_;
};

struct family_entry {
  family_id id;
  const char* name;
  std::initializer_list<const char*> model_types;
};

constexpr family_entry family_table[] = {
    {family_id::mixtral, "mixtral", {"mixtral"}},
    {family_id::qwen2_moe, "qwen2_moe", {"qwen2_moe"}},
    {family_id::qwen3_moe, "qwen3_moe", {"qwen3_moe"}},
    {family_id::olmoe, "olmoe", {"olmoe"}},
    {family_id::deepseek_v2, "deepseek_v2", {"deepseek_v2"}},
    {family_id::deepseek_v3, "deepseek_v3", {"deepseek_v3", "kimi_k2"}},
};

caf::error parse_rope(reader& r, const json& root, const std::string& source, model_config& c) {
  // Newer files: rope_parameters {rope_theta, rope_type, ...}; older: rope_theta + rope_scaling.
  const json* params = nullptr;
  std::string where;
  if (r.has("rope_parameters") && root.at("rope_parameters").is_object()) {
    params = &root.at("rope_parameters");
    where = "rope_parameters.";
  } else if (r.has("rope_scaling")) {
    if (!root.at("rope_scaling").is_object())
      return r.bad("rope_scaling", "must be an object or null");
    params = &root.at("rope_scaling");
    where = "rope_scaling.";
  }
  c.rope.theta = r.number({"rope_theta"}, 10000.0);
  if (!params) return r.error();
  reader p(*params, source, where);
  if (p.has("rope_theta")) c.rope.theta = p.number({"rope_theta"}, 10000.0);
  c.rope.type = p.string(p.has("rope_type") ? "rope_type" : "type", std::string("default"));
  if (c.rope.type == "default" || c.rope.type.empty()) {
    c.rope.type = "default";
  } else if (c.rope.type == "linear") {
    c.rope.factor = p.number({"factor"}, std::nullopt);
  } else if (c.rope.type == "yarn") {
    c.rope.factor = p.number({"factor"}, std::nullopt);
    c.rope.original_max_position =
        p.integer({"original_max_position_embeddings"}, c.max_position_embeddings, 1);
    c.rope.beta_fast = p.number({"beta_fast"}, 32.0);
    c.rope.beta_slow = p.number({"beta_slow"}, 1.0);
    c.rope.mscale = p.number({"mscale"}, 0.0);
    c.rope.mscale_all_dim = p.number({"mscale_all_dim"}, 0.0);
  } else {
    return make_error(model_errc::unsupported,
                      source + ": key '" + where + "rope_type' is '" + c.rope.type +
                          "'; supported: default, linear, yarn");
  }
  if (c.rope.factor <= 0) return p.bad("factor", "must be positive");
  if (auto e = p.error()) return e;
  return r.error();
}

}  // namespace

double rope_config::attention_factor() const {
  if (type != "yarn") return 1.0;
  auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
  // transformers: the ratio only when both are given, else get_mscale(factor).
  if (mscale != 0 && mscale_all_dim != 0) return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim);
  return get_mscale(factor, 1.0);
}

int model_config::num_moe_layers() const {
  int n = 0;
  for (bool b : moe_layer) n += b;
  return n;
}

const char* model_config::family_name() const { return model::family_name(family); }

std::optional<family_id> family_from_name(std::string_view name) {
  for (auto& f : family_table)
    if (name == f.name) return f.id;
  return std::nullopt;
}

const char* family_name(family_id f) {
  for (auto& e : family_table)
    if (e.id == f) return e.name;
  return "?";
}

caf::expected<model_config> parse_config(const std::string& text, const std::string& source) {
  json root = json::parse(text, nullptr, false);
  if (root.is_discarded()) return make_error(model_errc::bad_format, source + ": not well-formed JSON");
  if (!root.is_object()) return make_error(model_errc::bad_format, source + ": not a JSON object");
  reader r(root, source);
  model_config c;
  c.model_type = r.string("model_type", std::nullopt);
  if (auto e = r.error()) return e;
  if (r.has("architectures") && root.at("architectures").is_array() && !root.at("architectures").empty() &&
      root.at("architectures")[0].is_string())
    c.architecture = root.at("architectures")[0].get<std::string>();
  bool found = false;
  for (auto& f : family_table)
    for (auto t : f.model_types)
      if (c.model_type == t) {
        c.family = f.id;
        found = true;
      }
  if (!found) {
    std::string known;
    for (auto& f : family_table) known += std::string(known.empty() ? "" : ", ") + f.name;
    return make_error(model_errc::unsupported, source + ": key 'model_type' is '" + c.model_type +
                                                   "', not a supported architecture (supported: " + known + ")");
  }
  const bool deepseek = c.family == family_id::deepseek_v2 || c.family == family_id::deepseek_v3;

  auto act = r.string("hidden_act", std::string("silu"));
  if (act != "silu" && act != "swish")
    return make_error(model_errc::unsupported, source + ": key 'hidden_act' is '" + act + "'; only silu is supported");

  c.vocab_size = r.integer({"vocab_size"}, std::nullopt, 1);
  c.hidden_size = r.integer({"hidden_size"}, std::nullopt, 1);
  c.num_layers = static_cast<int>(r.integer({"num_hidden_layers"}, std::nullopt, 1, 4096));
  c.num_heads = static_cast<int>(r.integer({"num_attention_heads"}, std::nullopt, 1, 4096));
  c.num_kv_heads = static_cast<int>(r.integer({"num_key_value_heads"}, c.num_heads, 1, 4096));
  c.max_position_embeddings = r.integer({"max_position_embeddings"}, 4096, 1);
  // transformers' defaults when the key is absent: Mixtral and OLMoE 1e-5, the others 1e-6.
  const bool eps5 = c.family == family_id::mixtral || c.family == family_id::olmoe;
  c.rms_norm_eps = r.number({"rms_norm_eps"}, eps5 ? 1e-5 : 1e-6);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.intermediate_size = r.integer({"intermediate_size"}, std::nullopt, 1);
  if (auto e = r.error()) return e;
  if (c.num_heads % c.num_kv_heads != 0)
    return r.bad("num_key_value_heads", "(" + std::to_string(c.num_kv_heads) + ") must divide num_attention_heads (" +
                                            std::to_string(c.num_heads) + ")");
  // OLMoE always splits hidden_size evenly over the heads (its q_norm is hidden_size wide).
  c.head_dim = c.family == family_id::olmoe ? c.hidden_size / c.num_heads
                                            : r.integer({"head_dim"}, c.hidden_size / c.num_heads, 1);
  if (!r.has("head_dim") && c.hidden_size % c.num_heads != 0)
    return r.bad("hidden_size", "is not a multiple of num_attention_heads and no head_dim is given");

  // Routing.
  auto& g = c.gating;
  g.num_experts = static_cast<int>(r.integer({"num_local_experts", "num_experts", "n_routed_experts"}, std::nullopt, 1, 1 << 16));
  g.top_k = static_cast<int>(r.integer({"num_experts_per_tok"}, std::nullopt, 1, 1 << 16));
  if (auto e = r.error()) return e;
  if (g.top_k > g.num_experts)
    return r.bad("num_experts_per_tok", "(" + std::to_string(g.top_k) + ") exceeds the number of experts (" +
                                            std::to_string(g.num_experts) + ")");

  c.moe_layer.assign(static_cast<size_t>(c.num_layers), true);
  c.sliding_window.assign(static_cast<size_t>(c.num_layers), 0);

  switch (c.family) {
    case family_id::mixtral:
      g.norm_topk_prob = true;
      c.moe_intermediate_size = c.intermediate_size;
      if (r.has("sliding_window")) {
        auto w = r.integer({"sliding_window"}, 0, 0);
        for (auto& s : c.sliding_window) s = w;
      }
      break;
    case family_id::olmoe:
      g.norm_topk_prob = r.boolean("norm_topk_prob", false);
      c.moe_intermediate_size = c.intermediate_size;
      c.qkv_bias = c.o_bias = r.boolean("attention_bias", false);
      c.qk_norm = qk_norm_kind::whole;
      if (r.has("clip_qkv")) {
        c.clip_qkv = r.number({"clip_qkv"}, std::nullopt);
        if (*c.clip_qkv <= 0) return r.bad("clip_qkv", "must be positive");
      }
      break;
    case family_id::qwen2_moe:
    case family_id::qwen3_moe: {
      const bool qwen2 = c.family == family_id::qwen2_moe;
      g.norm_topk_prob = r.boolean("norm_topk_prob", !qwen2);
      c.moe_intermediate_size = r.integer({"moe_intermediate_size"}, std::nullopt, 1);
      if (qwen2) {
        c.qkv_bias = r.boolean("qkv_bias", true);
        c.shared_expert_intermediate_size = r.integer({"shared_expert_intermediate_size"}, 0, 0);
        c.shared_expert_gate = c.shared_expert_intermediate_size > 0;
      } else {
        c.qkv_bias = c.o_bias = r.boolean("attention_bias", false);
        c.qk_norm = qk_norm_kind::per_head;
      }
      auto step = r.integer({"decoder_sparse_step"}, 1, 1);
      auto mlp_only = r.int_list("mlp_only_layers");
      for (int l = 0; l < c.num_layers; ++l) {
        bool listed = std::find(mlp_only.begin(), mlp_only.end(), l) != mlp_only.end();
        c.moe_layer[static_cast<size_t>(l)] = !listed && (l + 1) % step == 0;
      }
      if (r.boolean("use_sliding_window", false)) {
        auto w = r.integer({"sliding_window"}, 0, 0);
        auto from = r.integer({"max_window_layers"}, 0, 0);
        for (int l = 0; l < c.num_layers; ++l)
          if (l >= from) c.sliding_window[static_cast<size_t>(l)] = w;
      }
      break;
    }
    case family_id::deepseek_v2:
    case family_id::deepseek_v3: {
      const bool v3 = c.family == family_id::deepseek_v3;
      c.attention = attention_kind::mla;
      c.moe_intermediate_size = r.integer({"moe_intermediate_size"}, std::nullopt, 1);
      // Defaults for absent keys are transformers' (DeepseekV2Config / DeepseekV3Config); an explicit
      // null q_lora_rank means no q LoRA (V2-Lite).
      auto n_shared = r.integer({"n_shared_experts"}, v3 ? 1 : 2, 0, 1024);
      c.shared_expert_intermediate_size = n_shared * c.moe_intermediate_size;
      c.q_lora_rank = root.contains("q_lora_rank") ? r.integer({"q_lora_rank"}, 0, 0) : 1536;
      if (r.boolean("attention_bias", false))
        return make_error(model_errc::unsupported, source + ": key 'attention_bias' is true; biased MLA projections are not supported");
      c.kv_lora_rank = r.integer({"kv_lora_rank"}, std::nullopt, 1);
      c.qk_nope_head_dim = r.integer({"qk_nope_head_dim"}, std::nullopt, 0);
      c.qk_rope_head_dim = r.integer({"qk_rope_head_dim"}, std::nullopt, 0);
      c.v_head_dim = r.integer({"v_head_dim"}, std::nullopt, 1);
      c.head_dim = c.qk_rope_head_dim;  // the rotary part is what RoPE sees
      c.qkv_bias = false;
      c.o_bias = false;
      // V3 files may say rope_interleave (default true); V2's modeling always interleaves.
      c.rope.interleave = v3 ? r.boolean("rope_interleave", true) : true;
      c.num_nextn_predict_layers = static_cast<int>(r.integer({"num_nextn_predict_layers"}, 0, 0, 64));
      g.norm_topk_prob = r.boolean("norm_topk_prob", v3);
      g.routed_scaling_factor = r.number({"routed_scaling_factor"}, v3 ? 2.5 : 1.0);
      g.norm_eps = 1e-20;
      g.scale_only_unnormalised = !v3;
      g.n_group = static_cast<int>(r.integer({"n_group"}, v3 ? 8 : 1, 1, 1 << 16));
      g.topk_group = static_cast<int>(r.integer({"topk_group"}, v3 ? 4 : 1, 1, 1 << 16));
      auto scoring = r.string("scoring_func", std::string(v3 ? "sigmoid" : "softmax"));
      if (scoring == "softmax") {
        g.scoring = scoring_func::softmax;
      } else if (scoring == "sigmoid") {
        g.scoring = scoring_func::sigmoid;
      } else {
        return make_error(model_errc::unsupported, source + ": key 'scoring_func' is '" + scoring + "'; supported: softmax, sigmoid");
      }
      auto method = r.string("topk_method", std::string(v3 ? "noaux_tc" : "greedy"));
      if (method == "greedy") {
        g.method = topk_method::greedy;
      } else if (method == "group_limited_greedy") {
        g.method = topk_method::group_limited_greedy;
      } else if (method == "noaux_tc") {
        g.method = topk_method::noaux_tc;
        g.has_score_bias = true;
      } else {
        return make_error(model_errc::unsupported, source + ": key 'topk_method' is '" + method +
                                                       "'; supported: greedy, group_limited_greedy, noaux_tc");
      }
      if (g.num_experts % g.n_group != 0)
        return r.bad("n_group", "(" + std::to_string(g.n_group) + ") must divide the number of experts");
      if (g.topk_group > g.n_group) return r.bad("topk_group", "exceeds n_group");
      auto first_dense = r.integer({"first_k_dense_replace"}, v3 ? 3 : 0, 0);
      auto freq = r.integer({"moe_layer_freq"}, 1, 1);
      for (int l = 0; l < c.num_layers; ++l) c.moe_layer[static_cast<size_t>(l)] = l >= first_dense && l % freq == 0;
      if (r.has("quantization_config")) {
        const auto& q = root.at("quantization_config");
        reader qr(q, source, "quantization_config.");
        auto qm = qr.string("quant_method", std::string(""));
        auto fmt = qr.string("fmt", std::string("e4m3"));
        if (qm != "fp8" || fmt != "e4m3")
          return make_error(model_errc::unsupported, source + ": key 'quantization_config' (quant_method '" + qm +
                                                         "', fmt '" + fmt + "'): only fp8 e4m3 is supported");
        c.fp8_block = qr.int_list("weight_block_size");
        if (c.fp8_block.size() != 2 || c.fp8_block[0] <= 0 || c.fp8_block[1] <= 0)
          return qr.bad("weight_block_size", "must be two positive integers");
        if (auto e = qr.error()) return e;
      }
      break;
    }
  }
  if (auto e = r.error()) return e;
  if (!deepseek && c.gating.n_group != 1) return r.bad("n_group", "is only meaningful for DeepSeek models");
  if (auto e = parse_rope(r, root, source, c)) return e;
  if (c.head_dim % 2 != 0 && !deepseek) return r.bad("head_dim", "must be even for rotary embeddings");

  auto eos = r.int_list("eos_token_id");
  c.eos_token_ids = eos;
  if (r.has("bos_token_id")) c.bos_token_id = r.integer({"bos_token_id"}, std::nullopt, 0);
  if (auto e = r.error()) return e;
  return c;
}

caf::expected<model_config> load_config(const std::filesystem::path& dir) {
  auto path = dir / "config.json";
  std::ifstream in(path);
  if (!in) return make_error(model_errc::io_error, path.string() + ": cannot open (is this a model folder?)");
  std::stringstream ss;
  ss << in.rdbuf();
  auto c = parse_config(ss.str(), path.string());
  if (!c) return c;
  c->dir = dir;
  // generation_config.json's eos_token_id wins where present: it is what generate() stops on.
  auto gen = dir / "generation_config.json";
  if (std::ifstream gin(gen); gin) {
    json g = json::parse(gin, nullptr, false);
    if (g.is_object() && g.contains("eos_token_id")) {
      reader gr(g, gen.string());
      auto ids = gr.int_list("eos_token_id");
      if (auto e = gr.error()) return e;
      if (!ids.empty()) c->eos_token_ids = ids;
    }
  }
  return c;
}

}  // namespace sy::model
