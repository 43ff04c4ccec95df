#pragma once
/// Attention with a KV cache: grouped-query attention (Mixtral, Qwen, OLMoE) and multi-head latent
/// attention (DeepSeek), for a batch of sequences that each bring any number of new rows.
#include "model/config.hpp"
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
/// Row widths of the two per-layer cache streams.
[[nodiscard]] int64_t cache_width_a(const model_config& c);
[[nodiscard]] int64_t cache_width_b(const model_config& c);

/// A sequence's new rows [begin, end) of the step's input, placed at positions cache->length onward.
struct attention_seq {
  kv_cache* cache = nullptr;
  int64_t begin = 0, end = 0;
};

class attention {
 public:
  explicit attention(const model_config& c);

  /// out[T, hidden] = attention over x[T, hidden] (already normalised) for `layer`, appending the
  /// new rows' keys to each sequence's cache (its `length` is left for the caller to advance).
  void forward(int layer, const attention_weights& w, const float* x, std::span<const attention_seq> seqs,
               float* out) const;

  [[nodiscard]] double softmax_scale() const { return softmax_scale_; }

 private:
  void gqa(int layer, const attention_weights& w, const float* x, std::span<const attention_seq> seqs, float* out) const;
  void mla(int layer, const attention_weights& w, const float* x, std::span<const attention_seq> seqs, float* out) const;

  const model_config& c_;
  rope_table rope_;
  double softmax_scale_ = 1.0;
};

}  // namespace sy::model
