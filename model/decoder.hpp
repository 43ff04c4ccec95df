#pragma once
/// The decoder: embeddings → layers (attention with a KV cache, then a dense MLP or the MoE block)
/// → final norm → LM head, for a batch of sequences that each bring any number of new tokens.
/// Prefill and decode are the same call: a prompt is many new tokens, a decode step one.
#include "model/moe.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"

#include <span>
#include <vector>

namespace sy::model {

/// One sequence's cache. GQA: per layer K and V rows [len, kv_heads·head_dim]. MLA: per layer the
/// normalised latent [len, kv_lora_rank] and the rotated rope key [len, qk_rope_head_dim] — never
/// the expanded per-head K and V.
struct kv_cache {
  std::vector<std::vector<float>> a, b;
  int64_t length = 0;
  void clear() {
    a.clear();
    b.clear();
    length = 0;
  }
  [[nodiscard]] size_t bytes() const;
};

/// Bytes of cache per token and layer, as stored, and as expanded per-head K/V would take.
struct cache_footprint {
  int64_t stored = 0;
  int64_t expanded = 0;
};
[[nodiscard]] cache_footprint cache_bytes_per_token(const model_config& c);

/// One sequence's part of a step.
struct sequence_step {
  kv_cache* cache = nullptr;
  std::span<const int32_t> tokens;  ///< appended at position cache->length
  bool all_logits = false;          ///< logits for every new token (else for the last one only)
  std::vector<float>* logits = nullptr;  ///< out: [n or 1, vocab]
};

/// Observes the MoE block's input and output (tests compare them with the reference).
struct moe_probe {
  int layer = -1;
  std::vector<float> in, out;
};

class decoder {
 public:
  /// `experts` computes the routed experts (local or remote); `w` must hold the dense weights.
  decoder(const model_weights& w, expert_executor& experts);

  /// Runs all sequences' new tokens through the model, appending to their caches. On error no
  /// cache has advanced.
  [[nodiscard]] caf::error step(std::span<sequence_step> batch, moe_probe* probe = nullptr);

  [[nodiscard]] const model_config& config() const { return w_.config; }

  /// The MoE block of `layer` on rows x [T, hidden] (post-attention-norm input) into y [T, hidden].
  [[nodiscard]] caf::error moe_block(int layer, const float* x, int64_t t, float* y);

 private:
  caf::error attention(int layer, const float* x, std::span<sequence_step> batch, const std::vector<int64_t>& offsets,
                       float* out);
  void attention_gqa(int layer, const float* x, std::span<sequence_step> batch, const std::vector<int64_t>& offsets,
                     float* out);
  void attention_mla(int layer, const float* x, std::span<sequence_step> batch, const std::vector<int64_t>& offsets,
                     float* out);

  const model_weights& w_;
  expert_executor& experts_;
  rope_table rope_;
  double softmax_scale_ = 1.0;
};

}  // namespace sy::model
