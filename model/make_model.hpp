#pragma once
/// Random-weight checkpoints in the Hugging Face hub layout (config.json, generation_config.json,
/// sharded safetensors with model.safetensors.index.json), for demos and benchmarks at real sizes.
#include "model/config.hpp"
#include "model/weights.hpp"

#include <filesystem>
#include <vector>

namespace sy::model {

struct make_model_options {
  family_id family = family_id::mixtral;
  int64_t hidden = 256;
  int64_t ffn = 512;         ///< routed expert FFN width
  int64_t dense_ffn = 0;     ///< dense MLP width (dense layers); 0 = 4 × ffn
  int64_t shared_ffn = -1;   ///< shared expert width (Qwen2-MoE, DeepSeek); -1 = family default
  int experts = 8;
  int top_k = 2;
  int layers = 2;
  int heads = 0;             ///< 0 = hidden / 64 (at least 1)
  int kv_heads = 0;          ///< 0 = heads / 4 (at least 1)
  int64_t vocab = 1024;
  // DeepSeek (MLA and routing); 0 / -1 pick the family's default.
  int64_t q_lora_rank = -1;   ///< -1: V3 hidden/4, V2 none (V2-Lite style); 0: none
  int64_t kv_lora_rank = 0;   ///< 0: max(16, hidden/8)
  int64_t qk_nope_dim = 0;    ///< 0: 32
  int64_t qk_rope_dim = 0;    ///< 0: 16
  int64_t v_head_dim = 0;     ///< 0: 32
  int groups = 1;             ///< n_group
  int topk_groups = 1;        ///< topk_group
  int first_dense = -1;       ///< first_k_dense_replace; -1: 1 for DeepSeek
  int shared_experts = -1;    ///< n_shared_experts; -1: V3 1, V2 2
  dtype weight_dtype = dtype::bf16;  ///< bf16, f32, or f8_e4m3 (DeepSeek: 128×128 block scales)
  uint64_t seed = 0;
  /// A skewed gate (DeepSeek's e_score_correction_bias): these experts of every layer get bias
  /// `hot_bias`, so top-k selection prefers them (the combine weights are unaffected).
  std::vector<int> hot_experts;
  float hot_bias = 0;
  int64_t shard_bytes = int64_t{2} << 30;
  progress_fn progress;
};

/// Writes the checkpoint into `dir` (created if needed). Weights are reproducible from the seed.
[[nodiscard]] caf::error make_model(const std::filesystem::path& dir, const make_model_options& opts);

}  // namespace sy::model
