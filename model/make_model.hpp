#pragma once
/// Random-weight checkpoints in the Hugging Face hub layout (config.json, generation_config.json,
/// sharded safetensors with model.safetensors.index.json), for demos and benchmarks at real sizes.
#include "model/config.hpp"
#include "model/weights.hpp"

#include <filesystem>

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
  dtype weight_dtype = dtype::bf16;  ///< bf16, f32 (or f8_e4m3 for DeepSeek)
  uint64_t seed = 0;
  int64_t shard_bytes = int64_t{2} << 30;
  progress_fn progress;
};

/// Writes the checkpoint into `dir` (created if needed). Weights are reproducible from the seed.
[[nodiscard]] caf::error make_model(const std::filesystem::path& dir, const make_model_options& opts);

}  // namespace sy::model
