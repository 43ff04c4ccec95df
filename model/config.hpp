#pragma once
/// The model configuration: every field of a Hugging Face `config.json` that changes the math, for
/// each supported family, normalised into one struct.
#include "model/error.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace sy::model {

enum class family_id : uint8_t { mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 };

/// How routing scores are made from the router logits.
enum class scoring_func : uint8_t { softmax, sigmoid };
/// How the top-k experts are chosen (DeepSeek's names; everyone else is `greedy`).
enum class topk_method : uint8_t { greedy, group_limited_greedy, noaux_tc };
/// Where q/k RMSNorm applies: not at all, per head over head_dim (Qwen3), or over the whole
/// projection before the head split (OLMoE).
enum class qk_norm_kind : uint8_t { none, per_head, whole };
enum class attention_kind : uint8_t { gqa, mla };

struct rope_config {
  std::string type = "default";  ///< default | linear | yarn
  double theta = 10000.0;
  double factor = 1.0;
  int64_t original_max_position = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;          ///< 0 = absent
  double mscale_all_dim = 0.0;  ///< 0 = absent
  bool interleave = false;  ///< DeepSeek's rope_interleave: pairs (2i, 2i+1) instead of halves
  /// Attention scaling factor applied to cos/sin (YaRN's 0.1·ln(factor)+1 and friends).
  [[nodiscard]] double attention_factor() const;
};

struct gating_config {
  int num_experts = 0;
  int top_k = 0;
  scoring_func scoring = scoring_func::softmax;
  topk_method method = topk_method::greedy;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  int n_group = 1;
  int topk_group = 1;
  bool has_score_bias = false;  ///< DeepSeek-V3's e_score_correction_bias
  double norm_eps = 0.0;        ///< added to the sum when renormalising (DeepSeek: 1e-20)
  /// DeepSeek-V2's rule: renormalise (when norm_topk_prob and top_k > 1) or scale, never both.
  bool scale_only_unnormalised = false;
};

struct model_config {
  std::filesystem::path dir;
  std::string architecture;
  std::string model_type;
  family_id family = family_id::mixtral;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;      ///< dense MLP width
  int64_t moe_intermediate_size = 0;  ///< routed expert FFN width
  int64_t shared_expert_intermediate_size = 0;  ///< 0 = no shared expert
  bool shared_expert_gate = false;    ///< Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales it
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool qkv_bias = false;
  bool o_bias = false;
  qk_norm_kind qk_norm = qk_norm_kind::none;
  std::optional<double> clip_qkv;
  bool tie_word_embeddings = false;
  rope_config rope;
  gating_config gating;
  attention_kind attention = attention_kind::gqa;
  std::vector<bool> moe_layer;        ///< per layer: routed experts (true) or a dense MLP
  std::vector<int64_t> sliding_window;  ///< per layer: 0 = full attention

  // Multi-head latent attention (DeepSeek).
  int64_t q_lora_rank = 0;  ///< 0 = no q LoRA
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int num_nextn_predict_layers = 0;
  /// FP8 block quantisation ([rows, cols] block), empty when the weights are not quantised.
  std::vector<int64_t> fp8_block;

  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> bos_token_id;

  [[nodiscard]] int num_moe_layers() const;
  [[nodiscard]] int64_t q_head_dim() const { return attention == attention_kind::mla ? qk_nope_head_dim + qk_rope_head_dim : head_dim; }
  [[nodiscard]] const char* family_name() const;
};

/// Reads `dir/config.json` (and `generation_config.json` for EOS ids when present).
/// Errors name the file and the key.
[[nodiscard]] caf::expected<model_config> load_config(const std::filesystem::path& dir);
/// Parses a config.json text; `source` names it in messages.
[[nodiscard]] caf::expected<model_config> parse_config(const std::string& text, const std::string& source);

[[nodiscard]] std::optional<family_id> family_from_name(std::string_view name);
[[nodiscard]] const char* family_name(family_id f);

}  // namespace sy::model
