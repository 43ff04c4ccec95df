#pragma once
/// Loading a model's weights from a checkpoint folder: all of them, only the dense part (a router),
/// or only some experts (an expert host).
#include "model/config.hpp"
#include "model/moe.hpp"
#include "model/safetensors.hpp"

#include <functional>
#include <memory>
#include <optional>
#include <vector>

namespace sy::model {

struct attention_weights {
  // Grouped-query attention.
  matrix q, k, v, o;
  std::vector<float> q_bias, k_bias, v_bias, o_bias;
  std::vector<float> q_norm, k_norm;
  // Multi-head latent attention (DeepSeek): q = q_b(norm(q_a(x))) or q_proj(x); kv_a gives the
  // latent and the rope key, kv_b expands the normalised latent into per-head k_nope and v.
  matrix q_a, q_b, kv_a, kv_b;
  std::vector<float> q_a_norm, kv_a_norm;
};

struct moe_weights {
  matrix router;                    ///< [E, H], f32
  std::vector<float> score_bias;    ///< [E] e_score_correction_bias, or empty
  std::unique_ptr<expert_weights> shared;  ///< shared expert(s), or null
  matrix shared_gate;               ///< [1, H] (Qwen2-MoE), or empty
};

struct layer_weights {
  std::vector<float> input_norm, post_norm;
  attention_weights attn;
  std::unique_ptr<expert_weights> dense_mlp;  ///< dense layers only
  moe_weights moe;                            ///< sparse layers only
};

struct model_weights {
  model_config config;
  matrix embed;                  ///< [V, H]
  std::vector<float> final_norm;
  matrix lm_head;                ///< [V, H]; empty when tied to `embed`
  std::vector<layer_weights> layers;
  std::vector<layer_experts> experts;  ///< routed experts held here, per layer (empty vectors for dense layers)

  [[nodiscard]] const matrix& output_matrix() const { return lm_head.empty() ? embed : lm_head; }
};

/// Progress of a long load: `done` of `total` bytes of weights.
using progress_fn = std::function<void(size_t done, size_t total)>;

struct load_options {
  bool dense = true;  ///< embeddings, attention, norms, routers, shared experts, LM head
  /// Which routed experts to hold; null = all.
  std::function<bool(int layer, int expert)> want_expert;
  /// Storage type of large matrices: nullopt = bf16 when the checkpoint stores bf16 or fp8, else f32.
  std::optional<dtype> weight_dtype;
  progress_fn progress;
  /// One-line notices worth a log line (e.g. skipped multi-token-prediction layers).
  std::function<void(const std::string&)> notice;
};

/// Loads what `opts` asks for. Every error names the folder or file and the tensor or key.
[[nodiscard]] caf::expected<std::unique_ptr<model_weights>> load_model(const std::filesystem::path& dir,
                                                                       const load_options& opts = {});
[[nodiscard]] caf::expected<std::unique_ptr<model_weights>> load_model(const model_config& cfg, const checkpoint& ckpt,
                                                                       const load_options& opts = {});

/// Loads one routed expert (an expert host's unit of work).
[[nodiscard]] caf::expected<expert_weights> load_expert(const model_config& cfg, const checkpoint& ckpt, int layer,
                                                        int expert, std::optional<dtype> weight_dtype = std::nullopt);

}  // namespace sy::model
